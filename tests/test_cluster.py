"""Cluster tests: several real daemons on 127.0.0.1 sharing chunks peer-to-peer.

Real FUSE mounts, a real S3 endpoint (moto behind the counting proxy) and,
for membership, a real etcd process (tests/etcd_env.py).  Assertions are
counts and bytes, never timings.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import random
import shutil
import time
import urllib.request
from functools import partial

import pytest
import trio
from cachefs_env import cli, wait_for
from certs import CA
from etcd_env import etcd_available, free_port, start_etcd
from test_cli import one_line_error

from cachefs.cluster.membership import (
    EtcdError,
    EtcdMembership,
    parse_peer,
    prefix_end,
    resolve_self,
)
from cachefs.cluster.peer import PeerClient, PeerError, serve_peers
from cachefs.errors import ConfigError

SECRET = "cluster-test-secret"
CHUNK = 64 * 1024


# -- helpers ------------------------------------------------------------------------------


def put_files(s3, bucket: str, sizes: dict[str, int], seed: int = 7) -> dict[str, bytes]:
    rnd = random.Random(seed)
    out = {}
    for key, size in sizes.items():
        data = rnd.randbytes(size)
        s3.put_object(Bucket=bucket, Key=key, Body=data)
        out[key] = data
    return out


def nchunks(files: dict[str, bytes]) -> int:
    return sum(-(-len(d) // CHUNK) for d in files.values())


def start_cluster(mounts, bucket, n=3, *, env_for=None, extra_for=None, names=None,
                  config=None, source_for=None, one_by_one=False, more_peers=()):
    """n daemons with a static ring n0..n{n-1}; returns them started (``one_by_one``: each
    once the one before is up; ``more_peers``: "id=host:port" members that are no daemon)."""
    names = names or [f"n{i}" for i in range(n)]
    ports = [free_port() for _ in names]
    peers = ",".join([*(f"{nm}=127.0.0.1:{p}" for nm, p in zip(names, ports, strict=True)),
                      *more_peers])
    ms = []
    for i, (nm, p) in enumerate(zip(names, ports, strict=True)):
        env = {"CACHEFS_PEER_SECRET": SECRET, **((env_for or {}).get(nm, {}))}
        extra = ("--node-id", nm, "--peer-listen", f"127.0.0.1:{p}", "--peers", peers,
                 *((extra_for or {}).get(nm, ())))
        ms.append(mounts((source_for or {}).get(nm, f"s3://{bucket}"), name=f"{nm}-{i}",
                         start=False, extra=extra, env=env, config=config))
    if one_by_one:
        for m in ms:
            m.start()
    else:
        start_all(ms)
    return ms


def start_all(ms):
    with cf.ThreadPoolExecutor(len(ms)) as ex:
        list(ex.map(lambda m: m.start(), ms))


def read_all(m, files: dict[str, bytes], block: int = 256 * 1024) -> dict[str, bytes]:
    out = {}
    for key in files:
        with open(m.path(key), "rb", buffering=0) as f:
            parts = []
            while True:
                b = f.read(block)
                if not b:
                    break
                parts.append(b)
        out[key] = b"".join(parts)
    return out


def cluster_stats(m) -> dict:
    return m.stats()["cluster"]


def gets(proxy) -> int:
    return proxy.stats()["ops"].get("GetObject", 0)


def put_owned_files(s3, bucket: str, n: int, nodes: list[str], owner: str,
                    stem: str = "o") -> dict[str, bytes]:
    """``n`` one-chunk files whose chunk ``owner`` owns on the ring of ``nodes``."""
    import hashlib

    from cachefs.chunks.ids import chunk_id
    from cachefs.cluster.ring import HashRing

    ring, out, seed = HashRing(nodes), {}, 0
    while len(out) < n:
        seed += 1
        key, data = f"{stem}/{seed}.bin", random.Random(seed).randbytes(CHUNK // 2)
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if ring.owner(chunk_id(bucket, key, etag, CHUNK, 0)) == owner:
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            out[key] = data
    return out


def read_each(m, files: dict[str, bytes]) -> dict[str, bytes]:
    """Every file read at once, a thread each."""
    with cf.ThreadPoolExecutor(len(files)) as ex:
        return dict(zip(files, ex.map(lambda k: m.path(k).read_bytes(), files), strict=True))


# -- unit: identities -------------------------------------------------------------------


def test_peer_entries_and_self_identity():
    assert parse_peer("10.0.0.1:7070") == ("10.0.0.1:7070", "10.0.0.1:7070")
    assert parse_peer(" gpu-07 = gpu-07.lan:7070 ") == ("gpu-07", "gpu-07.lan:7070")
    peers = ["gpu-01:7070", "gpu-02:7070", "gpu-07:7070"]
    # the example of the docs: --node-id gpu-07 matches the entry gpu-07:7070
    nid, members = resolve_self("gpu-07", "0.0.0.0:7070", "gpu-07:7070", peers)
    assert nid == "gpu-07:7070" and set(members) == set(peers)
    # no --node-id: our advertised address names our entry
    assert resolve_self(None, "0.0.0.0:7070", "gpu-02:7070", peers)[0] == "gpu-02:7070"
    # explicit ids
    named = ["a=h1:1", "b=h2:1"]
    assert resolve_self("b", "0.0.0.0:1", "x:1", named)[0] == "b"
    with pytest.raises(ConfigError, match="not in --peers"):
        resolve_self("zz", "0.0.0.0:9", "elsewhere:9", peers)
    with pytest.raises(ConfigError, match="twice"):
        resolve_self("a", "h1:1", "h1:1", ["a=h1:1", "a=h3:1"])
    # one node under two ids would ask itself for the other id's chunks
    with pytest.raises(ConfigError, match="'a' and 'b' have the same address h1:1"):
        resolve_self("a", "h1:1", "h1:1", ["a=h1:1", "b=h1:1"])
    assert prefix_end("/cachefs/members/") == "/cachefs/members0"


def test_conflicting_membership_options_are_refused(tmp_path):
    """--peers together with --etcd was accepted and the static list silently ignored; a
    node id with '/' in etcd mode failed with exit 1 after the daemon had started."""
    mp = tmp_path / "mp"
    mp.mkdir()

    def mount(*extra):
        return cli("mount", "s3://some-bucket", str(mp), "--cache-dir", str(tmp_path / "c"),
                   "--cache-size", "64MiB", "--endpoint-url", "http://127.0.0.1:1",
                   "--peer-listen", f"127.0.0.1:{free_port()}", *extra,
                   env={"CACHEFS_PEER_SECRET": SECRET})

    one_line_error(mount("--node-id", "a", "--peers", "a=127.0.0.1:7000,b=127.0.0.1:7001",
                         "--etcd", "http://127.0.0.1:1"),
                   "--peers and --etcd cannot be combined", code=2)
    one_line_error(mount("--node-id", "rack/a", "--etcd", "http://127.0.0.1:1"),
                   "node id 'rack/a' must not contain '/'", code=2)


@pytest.mark.trio
async def test_control_call_between_nodes():
    """The `call` op that ClusterNode.forward uses (cluster-wide preload/free/status)."""
    async def chunk_handler(chunk, trace):
        return b"x", []

    async def call_handler(name, payload):
        if name == "boom":
            raise PeerError("nope")
        return {"name": name, "echo": payload}

    async with trio.open_nursery() as n:
        port = await n.start(partial(serve_peers, "127.0.0.1", 0, SECRET.encode(), chunk_handler,
                                     call_handler=call_handler))
        async with PeerClient(SECRET.encode()) as c:
            addr = f"127.0.0.1:{port}"
            assert await c.call(addr, "preload", {"files": ["a"]}) == {
                "name": "preload", "echo": {"files": ["a"]}}
            with pytest.raises(PeerError) as e:
                await c.call(addr, "boom", {})
            assert e.value.reason == "remote"
            assert (await c.get(addr, {}, {}))[0] == b"x"  # same server still serves chunks
        n.cancel_scope.cancel()


# -- FUSE clusters ------------------------------------------------------------------------


def test_every_node_reads_everything_one_get_per_chunk(mounts, bucket, s3, proxy):
    files = put_files(s3, bucket, {"a.bin": 1_000_000, "b.bin": 700_001, "dir/c.bin": 300_000,
                                   "small": 1234})
    ms = start_cluster(mounts, bucket, 3)
    proxy.reset()
    with cf.ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda m: read_all(m, files), ms))
    for r in results:
        assert r == files
    assert gets(proxy) == nchunks(files)  # not 3x: each chunk read from S3 once, by its owner
    st = [cluster_stats(m) for m in ms]
    for s in st:
        assert s["ring_size"] == 3 and set(s["members"]) == {"n0", "n1", "n2"}
        assert s["requests_served"] > 0 and s["fetched_from_peers"] > 0
        assert not s["peer_errors"], s["peer_errors"]
    # every chunk is cached exactly once, on its owner
    assert sum(m.stats()["cache"]["chunks"] for m in ms) == nchunks(files)
    assert sum(s["bytes_served"] for s in st) == sum(s["bytes_from_peers"] for s in st)


def test_requests_that_wait_for_a_fetch_under_way_take_no_serving_slot(mounts, bucket, s3,
                                                                        proxy):
    """An owner's serving slots went to requests that only waited for a fetch already
    under way: when every node of a cluster asks for one cold chunk (a checkpoint all load
    at once), the owner answered all but the first 16 `busy` after the peer timeout, and
    each of those read the chunk from S3 itself. Here the owner has one slot, S3 answers
    in 3 s, and two nodes ask: one GET (it was two)."""
    import hashlib

    from cachefs.chunks.ids import chunk_id
    from cachefs.cluster.ring import HashRing

    ring = HashRing(["n0", "n1", "n2"])
    for salt in range(200):  # a one-chunk file that n0 owns
        data = random.Random(salt).randbytes(CHUNK)
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if ring.owner(chunk_id(bucket, "ckpt.bin", etag, CHUNK, 0)) == "n0":
            break
    s3.put_object(Bucket=bucket, Key="ckpt.bin", Body=data)
    ms = start_cluster(mounts, bucket, 3, env_for={"n0": {"CACHEFS_TEST_PEER_SLOTS": "1"}})
    for m in ms:
        assert m.path("ckpt.bin").stat().st_size == CHUNK
    proxy.reset()
    proxy.faults(delay=3, ops=["GetObject"], count=-1)
    with cf.ThreadPoolExecutor(2) as ex:
        first = ex.submit(read_all, ms[1], {"ckpt.bin": data})
        wait_for(lambda: proxy.stats(settle=0)["inflight"] >= 1, 10, "the owner's GET")
        second = ex.submit(read_all, ms[2], {"ckpt.bin": data})
        assert first.result(timeout=30) == second.result(timeout=30) == {"ckpt.bin": data}
    assert gets(proxy) == 1
    assert cluster_stats(ms[0])["requests_served"] == 2
    # the second request came while the GET ran (or this test tested nothing)
    assert ms[0].counters().get("singleflight_joins") == 1
    for m in ms[1:]:
        assert cluster_stats(m)["fetched_from_peers"] == 1


def test_sigkill_one_node_mid_read(mounts, bucket, s3, proxy):
    files = put_files(s3, bucket, {f"f{i}.bin": 900_000 for i in range(6)}, seed=11)
    total = nchunks(files)
    ms = start_cluster(mounts, bucket, 3)
    proxy.reset()
    # S3 slow enough that the kill lands mid-read: on loopback the reads could end between
    # the quarter mark and the kill, and nobody met the dead node
    proxy.faults(delay=0.3, ops=["GetObject"], count=-1)
    with cf.ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(read_all, m, files, 64 * 1024) for m in ms[1:]]
        wait_for(lambda: gets(proxy) >= total // 4 or all(f.done() for f in futs), 60,
                 "a quarter of the chunks")
        ms[0].kill()
        assert not all(f.done() for f in futs)
        results = [f.result(timeout=120) for f in futs]
    for r in results:
        assert r == files
    st = [cluster_stats(m) for m in ms[1:]]
    errs = sum(sum(s["peer_errors"].get("n0", {}).values()) for s in st)
    assert errs > 0  # the survivors noticed n0 was gone, and read around it
    for s in st:
        assert s["ring_size"] == 3  # static ring: a dead node is skipped, not removed
    # a chunk is fetched from S3 at most once per surviving node plus once by n0
    assert gets(proxy) <= 3 * total
    # stats says when n0 last failed and why (its "healthy" comes back after 10 s, dead
    # or not, and was all stats showed)
    proxy.clear_faults()
    noticed = next(m for m, s in zip(ms[1:], st, strict=True) if s["peer_errors"].get("n0"))
    last = cluster_stats(noticed)["members"]["n0"]["last_failure"]
    assert last["reason"] in ("connect", "closed", "short_read", "unacknowledged"), last
    r = cli("stats", "--mount", str(noticed.mp))
    assert r.returncode == 0, r.stderr
    assert any(ln.startswith("    n0           last failed ") and f"({last['reason']})" in ln
               for ln in r.stdout.splitlines()), r.stdout


def test_corrupting_peer_is_bypassed(mounts, bucket, s3, proxy):
    files = put_files(s3, bucket, {"x.bin": 1_500_000}, seed=3)
    ms = start_cluster(mounts, bucket, 2, env_for={"n0": {"CACHEFS_TEST_CORRUPT_PEER": "1"}})
    assert read_all(ms[1], files) == files
    s1 = cluster_stats(ms[1])
    assert s1["peer_errors"]["n0"].get("checksum", 0) >= 1
    assert s1["members"]["n0"]["healthy"] is False
    assert s1["fetched_from_peers"] == 0  # nothing corrupted got through
    assert read_all(ms[0], files) == files  # n0's own data is fine


def test_wrong_or_missing_secret_is_refused(mounts, bucket, s3, proxy):
    files = put_files(s3, bucket, {"s.bin": 600_000}, seed=5)
    ms = start_cluster(mounts, bucket, 2, env_for={"n1": {"CACHEFS_PEER_SECRET": "not-it"}})
    assert read_all(ms[1], files) == files
    s0, s1 = cluster_stats(ms[0]), cluster_stats(ms[1])
    assert s1["peer_errors"]["n0"].get("unauthorized", 0) >= 1
    assert s1["fetched_from_peers"] == 0 and s0["requests_served"] == 0

    # a client with the wrong secret gets nothing from the peer port
    async def probe():
        async with PeerClient(b"wrong") as c:
            with pytest.raises(PeerError) as e:
                await c.get(s0["listen"], {"bucket": bucket}, {})
            return e.value.reason

    assert trio.run(probe) == "unauthorized"

    # no secret at all: the daemon refuses to start
    r = cli("mount", f"s3://{bucket}", str(ms[0].mp), "--foreground",
            "--cache-dir", str(ms[0].cache_dir) + "-x", "--cache-size", "64MiB",
            "--peer-listen", f"127.0.0.1:{free_port()}", "--peers", "127.0.0.1:1",
            env={"CACHEFS_PEER_SECRET": ""})
    assert r.returncode != 0 and "secret" in r.stderr


def etcd_config(tmp_path, etcd, prefix: str, ttl: int, grace: int):
    """A config file for nodes of the etcd cluster ``etcd`` under ``prefix``."""
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f'[cluster]\netcd = ["{etcd.url}"]\netcd_prefix = "{prefix}"\n'
                   f"lease_ttl = {ttl}\ngrace_period = {grace}\n")
    return cfg


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_etcd_membership_join_and_leave(mounts, bucket, s3, proxy, tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    try:
        # (a lease of 2 s could lapse on a loaded host, e3 leave e2's ring for the grace
        # period and come back: e2 then read e3's quarter from its old owner. A stopped
        # node revokes its lease: it departs at once, whatever the TTL)
        ttl, grace = 6, 3
        cfg = etcd_config(tmp_path, etcd, "/t/members/", ttl, grace)

        def node(name):
            return mounts(f"s3://{bucket}", name=name, start=False, config=str(cfg),
                          env={"CACHEFS_PEER_SECRET": SECRET},
                          extra=("--node-id", name, "--peer-listen",
                                 f"127.0.0.1:{free_port()}"))

        ms = [node(f"e{i}") for i in range(3)]
        start_all(ms)
        for m in ms:
            wait_for(lambda m=m: cluster_stats(m)["ring_size"] == 3, 10, "3 members")

        files = put_files(s3, bucket, {"e.bin": 2_000_000}, seed=9)
        proxy.reset()
        assert read_all(ms[0], files) == files and read_all(ms[1], files) == files
        assert gets(proxy) == nchunks(files)

        # a fourth node appears in every ring (its put is watched, not polled)
        m4 = node("e3").start()
        for m in ms:  # (each check is a `cachefs stats` of its own: a loaded host's seconds)
            wait_for(lambda m=m: cluster_stats(m)["members"].get("e3", {}).get("state")
                     == "alive", 10, "e3 to join")
        assert cluster_stats(m4)["ring_size"] == 4
        changes = cluster_stats(ms[2])["ring_changes"]
        # the newcomer owns a quarter of the chunks now; it takes them over from
        # their previous owner's cache (one round trip each), not from S3, also those
        # another node asks it for before it has read them itself (a node that had not
        # read yet, reading first: e3's quarter comes from e3, which pools connections)
        before = gets(proxy)
        addr4 = cluster_stats(ms[2])["members"]["e3"]["address"]
        assert read_all(ms[2], files) == files
        s2 = cluster_stats(ms[2])
        # e3 stayed in e2's ring throughout (a lapsed lease would say so here)
        assert s2["ring_changes"] == changes and cluster_stats(m4)["etcd"]["registrations"] == 1
        assert addr4 in s2["client"]["peers"]
        assert gets(proxy) == before
        h = cluster_stats(m4)["handoff"]
        assert h["received"] > 0 and h["not_found"] == 0
        assert read_all(m4, files) == files
        assert gets(proxy) == before

        # stopped: still in the rings during the grace period, then gone
        # (it leaves etcd at some point during stop(), so after t_stop)
        t_stop = time.monotonic()
        m4.stop()
        wait_for(lambda: cluster_stats(ms[0])["members"].get("e3", {}).get("state")
                 == "departing", ttl + 1, "e3 to be departing")
        seen = [("e3" in cluster_stats(m)["members"]) for m in ms]
        if time.monotonic() - t_stop < grace - 0.5:  # (asked within the grace period)
            assert all(seen), seen
        for m in ms:
            wait_for(lambda m=m: "e3" not in cluster_stats(m)["members"], grace + ttl + 2,
                     "e3 to leave")
        assert time.monotonic() - t_stop >= grace - 0.5
        for m in ms:
            s = cluster_stats(m)
            assert s["ring_size"] == 3 and s["etcd"]["leaves"] >= 1
            # the pool of connections to the node that left went with it
            assert addr4 not in s["client"]["peers"], s["client"]["peers"]
    finally:
        etcd.stop()


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_an_etcd_outage_keeps_the_ring_and_clears_its_error(mounts, bucket, s3, proxy,
                                                             tmp_path):
    """etcd down: the nodes keep the members they know (no one departs, however long it
    lasts), share chunks as before, and say why in stats; etcd back: the error is gone
    and the ring is the same."""
    etcd = start_etcd(tmp_path / "etcd")
    try:
        ttl, grace = 2, 2
        cfg = etcd_config(tmp_path, etcd, "/o/members/", ttl, grace)
        # read first during the outage (uploaded now: the listing is cached from the start)
        files = put_files(s3, bucket, {"outage/during.bin": 700_000}, seed=22)
        port = free_port()
        ms = two_nodes_sharing(mounts, s3, bucket, proxy, cfg, "o", seed=21,
                               first_extra=("--metrics-listen", f"127.0.0.1:{port}"))
        for m in ms:
            assert cluster_stats(m)["etcd"]["last_error"] is None

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return r.read().decode()

        assert "\ncachefs_etcd_up 1\n" in metrics()

        r = cli("stats", "--mount", str(ms[0].mp))
        assert "    etcd       answering (" in r.stdout and "ring of 2 nodes" in r.stdout, \
            r.stdout
        etcd.pause()
        for m in ms:
            wait_for(lambda m=m: cluster_stats(m)["etcd"]["last_error"], ttl + 2,
                     "the outage in stats")
        # said in the text stats and the metrics too (only --json said it: the probes and
        # the text showed "2 members" while the membership was frozen)
        r = cli("stats", "--mount", str(ms[0].mp))
        assert "    etcd       not answering: " in r.stdout, r.stdout
        assert "\ncachefs_etcd_up 0\n" in metrics()
        time.sleep(grace + ttl + 1)  # longer than a departed node stays in the ring
        proxy.reset()
        assert read_all(ms[0], files) == files and read_all(ms[1], files) == files
        assert gets(proxy) == nchunks(files)  # the second node read from the first
        for m in ms:
            s = cluster_stats(m)
            assert s["ring_size"] == 2, s["members"]
            assert all(v["state"] == "alive" for v in s["members"].values()), s["members"]
            err = s["etcd"]["last_error"]  # the address it failed to reach, or the watch's
            assert etcd.url.rsplit(":", 1)[1] in err or err.startswith("watch:"), err

        etcd.restart()
        for m in ms:
            wait_for(lambda m=m: cluster_stats(m)["etcd"]["last_error"] is None, 3 * ttl + 6,
                     "the error to clear once etcd answers")
            s = cluster_stats(m)
            assert s["ring_size"] == 2 and s["etcd"]["keepalive_failures"] >= 1, s
    finally:
        etcd.stop()


def two_nodes_sharing(mounts, s3, bucket, proxy, cfg, name: str, *, seed: int,
                      env: dict | None = None, extra: tuple = (),
                      first_extra: tuple = ()) -> list:
    """Two nodes of the etcd cluster in ``cfg`` find each other, and a file read on both
    costs one GET per chunk (the second node reads from the first). ``first_extra``:
    flags of the first node only."""
    ms = [mounts(f"s3://{bucket}", name=f"{name}{i}", start=False, config=str(cfg),
                 env={"CACHEFS_PEER_SECRET": SECRET, **(env or {})},
                 extra=("--node-id", f"{name}{i}", "--peer-listen",
                        f"127.0.0.1:{free_port()}", *extra, *(() if i else first_extra)))
          for i in range(2)]
    start_all(ms)
    for m in ms:
        wait_for(lambda m=m: cluster_stats(m)["ring_size"] == 2, 5, "2 members")
    files = put_files(s3, bucket, {f"{name}.bin": 1_000_000}, seed=seed)
    proxy.reset()
    assert read_all(ms[0], files) == files and read_all(ms[1], files) == files
    assert gets(proxy) == nchunks(files)
    return ms


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_etcd_over_tls_with_client_certificates(mounts, bucket, s3, proxy, tmp_path):
    """An etcd that serves https only and demands a client certificate its CA signed
    (--client-cert-auth): nodes given etcd_ca/etcd_cert/etcd_key join and share chunks; a
    node without a certificate is refused at mount, on one line; TLS options that cannot
    work are configuration errors."""
    ca = CA(tmp_path / "pki")
    etcd = start_etcd(tmp_path / "etcd", tls=ca)
    try:
        cert, key = ca.issue("cachefs-node")
        base = (f'[cluster]\netcd = ["{etcd.url}"]\netcd_prefix = "/tls/members/"\n'
                f'lease_ttl = 2\netcd_ca = "{ca.pem}"\n')
        good = tmp_path / "good.toml"
        good.write_text(base + f'etcd_cert = "{cert}"\netcd_key = "{key}"\n')
        ms = two_nodes_sharing(mounts, s3, bucket, proxy, good, "t", seed=11)

        def mount_with(text: str):
            cfg = tmp_path / "other.toml"
            cfg.write_text(text)
            mp = tmp_path / "mp-x"
            mp.mkdir(exist_ok=True)
            return cli("mount", f"s3://{bucket}", str(mp), "--config", str(cfg),
                       "--cache-dir", str(tmp_path / "c-x"), "--cache-size", "64MiB",
                       "--endpoint-url", proxy.url, "--node-id", "x",
                       "--peer-listen", f"127.0.0.1:{free_port()}",
                       env={"CACHEFS_PEER_SECRET": SECRET})

        one_line_error(mount_with(base), "etcd", "certificate")  # etcd wants a certificate
        one_line_error(mount_with(base + f'etcd_cert = "{cert}"\n'), "etcd_key")
        one_line_error(mount_with(base + f'etcd_cert = "{cert}"\netcd_key = "/nope.key"\n'),
                       "cannot read")
        plain = base.replace("https://", "http://")
        one_line_error(mount_with(plain + f'etcd_cert = "{cert}"\netcd_key = "{key}"\n'),
                       "not an https:// endpoint")
        assert all(cluster_stats(m)["ring_size"] == 2 for m in ms)  # x never joined
    finally:
        etcd.stop()


class SilencingProxy:
    """A TCP proxy in front of etcd that can make the flows open at one moment go silent
    (no FIN, no RST: a NAT or load balancer that forgot them, a partition); connections
    made later are forwarded as usual."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.generation = 0

    async def handle(self, down) -> None:
        gen = self.generation
        try:
            up = await trio.open_tcp_stream("127.0.0.1", self.port)
        except OSError:
            await down.aclose()
            return

        async def pump(a, b) -> None:
            try:
                while True:
                    data = await a.receive_some(65536)
                    if not data:
                        break
                    if gen != self.generation:
                        await trio.sleep_forever()
                    await b.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with up, down, trio.open_nursery() as n:
            n.start_soon(pump, down, up)
            n.start_soon(pump, up, down)


async def behind_a_silencer(tmp_path, body) -> None:
    """``await body(etcd, proxy, url, nursery)`` with a new etcd behind a SilencingProxy
    listening at ``url``; everything stopped after."""
    etcd = start_etcd(tmp_path / "etcd")
    try:
        px = SilencingProxy(int(etcd.url.rsplit(":", 1)[1]))
        async with trio.open_nursery() as n:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            n.start_soon(trio.serve_listeners, px.handle, listeners)
            await body(etcd, px, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}",
                       n)
            n.cancel_scope.cancel()
    finally:
        etcd.stop()


def etcd_put(etcd, key: str, address: str, ttl: int = 60) -> str:
    lease = etcd.call("/v3/lease/grant", {"TTL": ttl})["ID"]
    etcd.call("/v3/kv/put", {"key": b64(key), "value": b64(json.dumps({"address": address})),
                             "lease": lease})
    return lease


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


async def trio_wait_for(pred, limit: float, what: str) -> None:
    """Poll pred (state of an object under test, which has no event to wait on)."""
    with trio.move_on_after(limit):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
async def test_a_watch_connection_that_goes_silent_is_watched_again(tmp_path):
    """A watch connection that died without a word (etcd's host lost power, a NAT forgot
    the flow) was never noticed: keepalives on new connections went on working, stats
    showed no error, and the node never saw a join or a leave again (40 s after, its ring
    still held a node that had left and lacked one that had joined)."""
    async def body(etcd, px, url, n) -> None:
        m = EtcdMembership([url], "/w/", "a", "127.0.0.1:7001", lease_ttl=3,
                           grace_period=1, watch_idle=2)
        await n.start(m.run)
        etcd_put(etcd, "/w/c", "127.0.0.1:7003")
        await trio_wait_for(lambda: "c" in m.members, 10, "c to join")
        px.generation += 1  # the watch's flow goes silent
        etcd_put(etcd, "/w/b", "127.0.0.1:7002")
        etcd.call("/v3/kv/deleterange", {"key": b64("/w/c")})
        await trio_wait_for(lambda: sorted(m.members) == ["a", "b"], 15,
                            "b to join and c to leave")
        assert m.statistics()["watch_renewals"] >= 1

    await behind_a_silencer(tmp_path, body)


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
async def test_one_keepalive_lost_on_a_dead_connection_keeps_the_lease(tmp_path):
    """A keepalive sent on a pooled connection that died without a word (etcd's pod moved
    behind its Service, a NAT forgot the flow) waited the request timeout, and the next
    one came a third of the TTL after that: the lease expired, every node saw this one
    leave, and it registered again.  Each keepalive now waits at most a third of the TTL,
    and one that failed is sent again at once, on a new connection."""
    async def body(etcd, px, url, n) -> None:
        # TTL 6 s: a keepalive every 2 s, waiting 2 s at most, sent again 0.5 s after a
        # failure: 4.5 s between two that etcd answers (2 + 5 + 2 before: past 6 s)
        m = EtcdMembership([url], "/k/", "a", "127.0.0.1:7001", lease_ttl=6,
                           grace_period=1, request_timeout=5)
        await n.start(m.run)
        await trio.sleep(2.5)  # a keepalive on the pooled connection
        px.generation += 1  # the flows open now go silent
        await trio_wait_for(lambda: m.statistics()["keepalive_failures"] >= 1, 10,
                            "a keepalive lost")
        await trio.sleep(7)  # past the TTL
        st = m.statistics()
        assert st["registrations"] == 1, st  # (2: the lease had expired)
        lease = etcd.call("/v3/kv/range", {"key": b64("/k/a")})["kvs"][0]["lease"]
        assert int(lease) == int(m.lease_id), (lease, m.lease_id)

    await behind_a_silencer(tmp_path, body)


async def test_a_watch_goes_on_from_the_last_revision_delivered():
    """The header of a watch's creation, and of a batch of events, names the store's
    current revision, which events still on their way may precede: taken as delivered, a
    watch created again after a silence would skip them for good. Only events and
    progress notifications move the revision a watch goes on from."""
    m = EtcdMembership(["http://127.0.0.1:1"], "/p/", "a", "127.0.0.1:7001")
    m.revision = 5
    await m._on_watch_message({"result": {"header": {"revision": "9"}, "created": True}})
    assert m.revision == 5
    put = {"type": "PUT", "kv": {"key": b64("/p/b"), "mod_revision": "7",
                                 "value": b64(json.dumps({"address": "127.0.0.1:7002"}))}}
    await m._on_watch_message({"result": {"header": {"revision": "9"}, "events": [put]}})
    assert m.revision == 7 and "b" in m.members
    await m._on_watch_message({"result": {"header": {"revision": "12"}}})  # progress
    assert m.revision == 12
    # a store behind what was seen (etcd recreated empty, restored from a backup): watched
    # from revision 13 it held back every event, joins and leaves, until it got there
    with pytest.raises(EtcdError, match="revision went back from 12 to 3"):
        await m._on_watch_message({"result": {"header": {"revision": "3"}, "created": True}})
    # a message of another shape (a proxy in front of etcd) is a broken watch: it raised
    # AttributeError outside every handler, and the daemon stopped, unmounting
    for odd in ({"result": {"events": [None]}}, {"result": {"events": [{"kv": []}]}},
                {"result": {"header": []}}):
        with pytest.raises(EtcdError, match="malformed"):
            await m._on_watch_message(odd)


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
async def test_a_node_whose_id_was_taken_while_its_lease_expired_keeps_serving(tmp_path):
    """A node whose lease expired (etcd unreachable longer than the TTL) registers again;
    when another node had registered its id meanwhile, the QuietError meant for start-up
    ended the daemon, unmounting under the jobs reading from it. It now keeps serving
    with the members it knows, says why in its stats, and registers once the id is free."""
    etcd = start_etcd(tmp_path / "etcd")
    try:
        async with trio.open_nursery() as n:
            m = EtcdMembership([etcd.url], "/i/", "a", "127.0.0.1:7001", lease_ttl=2,
                               grace_period=1)
            await n.start(m.run)
            own_lease = m.lease_id
            other = etcd_put(etcd, "/i/a", "127.0.0.1:9999")  # the same id, elsewhere
            etcd.call("/v3/lease/revoke", {"ID": own_lease})  # our lease expires
            await trio_wait_for(lambda: "already registered in etcd by a node at 127.0.0.1:9999"
                                in (m.statistics()["last_error"] or ""), 10, "the clash")
            await trio.sleep(2)  # keepalives go on failing to register: still running
            assert m.counters["id_taken"] >= 2
            etcd.call("/v3/lease/revoke", {"ID": other})  # the other node leaves
            await trio_wait_for(lambda: m.lease_id not in (None, own_lease), 10,
                                "registration")
            r = etcd.call("/v3/kv/range", {"key": b64("/i/a")})
            assert json.loads(base64.b64decode(r["kvs"][0]["value"])) == {
                "address": "127.0.0.1:7001"}
            assert m.statistics()["last_error"] is None
            n.cancel_scope.cancel()
    finally:
        etcd.stop()


async def test_a_key_gone_unseen_is_registered_again_from_a_snapshot(tmp_path):
    """A node's key deleted while its watch was down (and the history compacted since)
    was found missing by the next snapshot, which let it go: the lease lived on, the
    keepalive never registered again, and the other nodes left this one out for good."""
    etcd = start_etcd(tmp_path / "etcd")
    try:
        import httpx

        m = EtcdMembership([etcd.url], "/g/", "a", "127.0.0.1:7001", lease_ttl=30,
                           grace_period=1)
        async with httpx.AsyncClient() as m._client:
            await m._register()  # (no watch runs: the delete goes unseen)
            await trio.to_thread.run_sync(etcd.call, "/v3/kv/deleterange",
                                          {"key": b64("/g/a")})
            await m._snapshot()
            r = await trio.to_thread.run_sync(etcd.call, "/v3/kv/range", {"key": b64("/g/a")})
            assert json.loads(base64.b64decode(r["kvs"][0]["value"])) == {
                "address": "127.0.0.1:7001"}
            await m._revoke(m.lease_id)
    finally:
        etcd.stop()


async def test_two_nodes_starting_with_one_id_at_once_do_not_both_register(tmp_path):
    """Registration looked at the key, then put it: two nodes starting with the same
    --node-id at the same moment both registered (25 times in 40), the second over the
    first, and neither knew; the loser served on with a live lease, asked by no peer."""
    from cachefs.cluster.membership import NodeIdTaken

    etcd = start_etcd(tmp_path / "etcd")

    async def trial(prefix: str) -> None:
        won: list[str] = []
        taken: list[str] = []
        nodes = [EtcdMembership([etcd.url], prefix, "same", f"127.0.0.1:{7001 + i}",
                                lease_ttl=5, grace_period=1) for i in range(2)]

        async def start(m, n) -> None:
            try:
                await n.start(m.run)
                won.append(m.address)
            except NodeIdTaken:
                taken.append(m.address)

        async with trio.open_nursery() as n:
            for m in nodes:
                n.start_soon(start, m, n)
            await trio_wait_for(lambda: len(won) + len(taken) == 2, 10, "both answered")
            assert len(won) == 1 and len(taken) == 1, (prefix, won, taken)
            r = await trio.to_thread.run_sync(etcd.call, "/v3/kv/range",
                                              {"key": b64(prefix + "same")})
            assert json.loads(base64.b64decode(r["kvs"][0]["value"])) == {"address": won[0]}
            n.cancel_scope.cancel()

    try:
        for i in range(10):
            await trial(f"/dup{i}/")
    finally:
        etcd.stop()


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_etcd_with_user_and_password(mounts, bucket, s3, proxy, tmp_path):
    """etcd with --auth: nodes given --etcd-user and CACHEFS_ETCD_PASSWORD join and share
    chunks; the password is in no log and no argv; a wrong password, or none, fails the
    mount on one line."""
    import base64

    etcd = start_etcd(tmp_path / "etcd")
    b64 = lambda t: base64.b64encode(t.encode()).decode()  # noqa: E731
    try:
        for path, body in (
                ("/v3/auth/user/add", {"name": "root", "password": "root-pw"}),
                ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                ("/v3/auth/role/add", {"name": "cachefs"}),
                ("/v3/auth/role/grant", {"name": "cachefs", "perm": {
                    "permType": "READWRITE", "key": b64("/auth/members/"),
                    "range_end": b64("/auth/members0")}}),
                ("/v3/auth/user/add", {"name": "node", "password": "pw-Zq81x"}),
                ("/v3/auth/user/grant", {"user": "node", "role": "cachefs"}),
                ("/v3/auth/enable", {})):
            etcd.call(path, body)
        cfg = tmp_path / "cluster.toml"
        cfg.write_text(f'[cluster]\netcd = ["{etcd.url}"]\netcd_prefix = "/auth/members/"\n'
                       "lease_ttl = 2\n")
        ms = two_nodes_sharing(mounts, s3, bucket, proxy, cfg, "a", seed=12,
                               env={"CACHEFS_ETCD_PASSWORD": "pw-Zq81x"},
                               extra=("--etcd-user", "node"))
        for m in ms:
            assert "pw-Zq81x" not in m.log_text()
            with open(f"/proc/{m.proc.pid}/cmdline", "rb") as f:
                assert b"pw-Zq81x" not in f.read()

        # tokens die with an auth disable/enable (as with an etcd restart): the nodes
        # authenticate again, and keep their leases
        import json
        import urllib.request

        def as_root(path: str, body: dict) -> dict:
            token = etcd.call("/v3/auth/authenticate", {"name": "root",
                                                        "password": "root-pw"})["token"]
            req = urllib.request.Request(etcd.url + path, data=json.dumps(body).encode(),
                                         headers={"Authorization": token})
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())

        def members() -> list[str]:
            kvs = as_root("/v3/kv/range", {"key": b64("/auth/members/"),
                                           "range_end": b64("/auth/members0")}).get("kvs", [])
            return sorted(base64.b64decode(kv["key"]).decode() for kv in kvs)

        as_root("/v3/auth/disable", {})
        etcd.call("/v3/auth/enable", {})
        # a0's key deleted: it registers again, with a new token (the old one is refused)
        as_root("/v3/kv/deleterange", {"key": b64("/auth/members/a0")})
        wait_for(lambda: members() == ["/auth/members/a0", "/auth/members/a1"], 10,
                 "a0 to register again")
        assert all(cluster_stats(m)["ring_size"] == 2 for m in ms)

        def mount_with(*extra, **env):
            mp = tmp_path / "mp-x"
            mp.mkdir(exist_ok=True)
            return cli("mount", f"s3://{bucket}", str(mp), "--config", str(cfg),
                       "--cache-dir", str(tmp_path / "c-x"), "--cache-size", "64MiB",
                       "--endpoint-url", proxy.url, "--node-id", "x",
                       "--peer-listen", f"127.0.0.1:{free_port()}", *extra,
                       env={"CACHEFS_PEER_SECRET": SECRET, **env})

        one_line_error(mount_with(), "etcd has authentication enabled: give --etcd-user")
        line = one_line_error(mount_with("--etcd-user", "node", CACHEFS_ETCD_PASSWORD="wrong"),
                              "authentication as etcd user 'node' failed")
        assert "wrong" not in line
        one_line_error(mount_with("--etcd-user", "node"), "CACHEFS_ETCD_PASSWORD", code=2)
        one_line_error(mount_with(CACHEFS_ETCD_PASSWORD="pw-Zq81x"), "no --etcd-user", code=2)
        assert all(cluster_stats(m)["ring_size"] == 2 for m in ms)  # x never joined
    finally:
        etcd.stop()


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (Debian etcd-server)")
def test_restart_with_a_new_node_id_does_not_ask_itself(mounts, bucket, s3, proxy, tmp_path):
    """A node killed and started again at once with another --node-id on the same address:
    its old key lives in etcd until the lease expires, so its ring holds the old id at its
    own address.  Reads of the chunks the old id owns go to S3, not to this process itself
    (that request waited on this node's own flight for the chunk until the peer request
    timed out: every such read hung for the S3 timeout plus the peer timeout)."""
    import hashlib

    from cachefs.chunks.ids import chunk_id
    from cachefs.cluster.ring import HashRing

    etcd = start_etcd(tmp_path / "etcd")
    try:
        cfg = tmp_path / "cluster.toml"
        cfg.write_text(f'[cluster]\netcd = ["{etcd.url}"]\netcd_prefix = "/r/members/"\n'
                       "lease_ttl = 60\n")
        port = free_port()
        ring = HashRing(["e0", "old", "new"])
        for salt in range(100):  # a file with chunks the old id owns
            data = random.Random(salt).randbytes(600_000)
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            cids = [chunk_id(bucket, "r.bin", etag, CHUNK, i) for i in range(10)]
            if sum(ring.owner(c) == "old" for c in cids) >= 2:
                break
        s3.put_object(Bucket=bucket, Key="r.bin", Body=data)
        e0 = mounts(f"s3://{bucket}", name="e0", config=str(cfg),
                    env={"CACHEFS_PEER_SECRET": SECRET},
                    extra=("--node-id", "e0", "--peer-listen", f"127.0.0.1:{free_port()}"))
        m = mounts(f"s3://{bucket}", name="x", config=str(cfg), start=False,
                   env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "old", "--peer-listen", f"127.0.0.1:{port}",
                          "--s3-timeout", "3s"))
        m.start()
        m.kill()  # no revoke: the key "old" stays for the lease's 60 s
        m.extra = ("--node-id", "new", "--peer-listen", f"127.0.0.1:{port}", "--s3-timeout", "3s")
        m.start()
        st = cluster_stats(m)
        assert st["members"]["old"]["address"] == st["address"]
        assert read_all(m, {"r.bin": data}) == {"r.bin": data}
        st = cluster_stats(m)
        assert "old" not in st["peer_errors"], st["peer_errors"]
        assert st["requests_served"] == 0  # it never asked itself
        assert cluster_stats(e0)["ring_size"] == 3
        # a live id at another address is refused, saying when a crashed one's key expires
        mp = tmp_path / "mp-dup"
        mp.mkdir()
        one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--config", str(cfg),
                           "--cache-dir", str(tmp_path / "c-dup"), "--cache-size", "64MiB",
                           "--endpoint-url", proxy.url, "--node-id", "e0",
                           "--peer-listen", f"127.0.0.1:{free_port()}",
                           env={"CACHEFS_PEER_SECRET": SECRET}),
                       "node id 'e0' is already registered in etcd by a node at "
                       f"{cluster_stats(e0)['address']}", "within the lease TTL of 60 s",
                       code=1)
    finally:
        etcd.stop()


def test_a_node_with_another_chunk_size_or_a_wrong_peers_address_is_refused(
        mounts, bucket, s3, proxy, tmp_path):
    """Chunk ids include the chunk size: a node with another --chunk-size cached every
    data set a second time, and `free` run on one node left the other's copies (`status`
    there still said 100% cached).  A --peers list with a wrong address sent one node's
    chunks to another.  Both are refused at mount, on one line, when a member answers."""
    from cachefs_env import is_mounted

    files = put_files(s3, bucket, {"k.bin": 300_000}, seed=13)
    ms = start_cluster(mounts, bucket, 2, names=["n0", "n1"])
    p0, p1 = (cluster_stats(m)["address"] for m in ms)
    p2 = f"127.0.0.1:{free_port()}"
    mp = tmp_path / "mp-n2"
    mp.mkdir()

    def mount_n2(peers: str, *extra: str):
        return cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(tmp_path / "c-n2"),
                   "--cache-size", "64MiB", "--endpoint-url", proxy.url, "--node-id", "n2",
                   "--peer-listen", p2, "--peers", peers, *extra,
                   env={"CACHEFS_PEER_SECRET": SECRET})

    try:
        line = one_line_error(mount_n2(f"n0={p0},n1={p1},n2={p2}", "--chunk-size", "128KiB"),
                              "uses a chunk size of 64.0 KiB, this node 128.0 KiB",
                              "same --chunk-size", code=2)
        assert line.startswith(("cachefs: error: node n0 (", "cachefs: error: node n1 (")), line
        assert not is_mounted(mp)
        # (its cache dir recorded 128 KiB: another start with 64 KiB would warn of it)
        shutil.rmtree(tmp_path / "c-n2", ignore_errors=True)
        one_line_error(mount_n2(f"n0={p1},n1={p0},n2={p2}", "--chunk-size", "64KiB"),
                       f"--peers lists n0 at {p1}, but node n1 answers there", code=2)
        assert not is_mounted(mp)
        # the same node with the right list and chunk size joins
        r = mount_n2(f"n0={p0},n1={p1},n2={p2}", "--chunk-size", "64KiB")
        assert r.returncode == 0, r.stderr
        assert read_all(ms[0], files) == files
        assert (mp / "k.bin").read_bytes() == files["k.bin"]
    finally:
        if is_mounted(mp):
            cli("umount", str(mp))
    assert not is_mounted(mp)


class BuggyPeer:
    """A member that speaks the protocol with the secret but answers ds_fetch with a reply
    of the wrong shape: ``errors`` a list, not an object, and a throughput figure of
    Infinity (valid JSON to Python's json)."""

    def __init__(self, node_id: str) -> None:
        import threading

        async def call(name, payload):
            if name == "identity":
                return {"node_id": node_id, "chunk_size": CHUNK}
            if name == "ds_probe":  # nothing cached here, room for everything
                n = len(base64.b64decode(payload["ids"])) // 16
                return {"states": "0" * n, "store": {"limit": 1 << 30, "high": 1 << 30,
                                                     "pinned_bytes": 0, "used_bytes": 0}}
            if name == "ds_fetch":
                n = sum(len(o.get("idx", [])) for o in payload.get("objs", []))
                return {"codes": "e" * n, "errors": ["?"], "times": [[float("inf"), 1, 1]]}
            return {}

        async def chunk(c, t):
            raise PeerError("no chunks here")

        self.stop = threading.Event()
        started = threading.Event()

        async def main():
            async with trio.open_nursery() as n:
                self.port = await n.start(partial(serve_peers, "127.0.0.1", 0, SECRET.encode(),
                                                  chunk, call_handler=call))
                started.set()
                while not self.stop.is_set():  # noqa: ASYNC110
                    await trio.sleep(0.1)
                n.cancel_scope.cancel()

        self.thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_a_preload_survives_a_member_whose_reply_has_the_wrong_shape(mounts, bucket, s3,
                                                                     tmp_path):
    """A member that answered ds_fetch with ``errors`` that is not an object, or a figure
    of Infinity, ended the whole preload with an internal error (AttributeError,
    OverflowError). Its chunks now fail as a malformed reply, and the rest is preloaded."""
    import json

    files = put_files(s3, bucket, {f"bp/{i}.bin": 3 * CHUNK for i in range(4)}, seed=23)
    fake = BuggyPeer("n1")
    try:
        port = free_port()
        m = mounts(f"s3://{bucket}", name="n0", env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}",
                          "--peers", f"n0=127.0.0.1:{port},n1=127.0.0.1:{fake.port}"))
        lst = tmp_path / "bp.txt"
        lst.write_text("bp\n")
        r = cli("preload", "--file-list", str(lst), "--mount", str(m.mp), "--json")
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "node n1: malformed ds_fetch reply" in r.stderr, r.stderr
        res = json.loads(r.stdout)
        assert 0 < res["fetched_chunks"] < nchunks(files), res
        assert m.proc.poll() is None
    finally:
        fake.close()


class NotAPeer:
    """Something other than cachefs listening at a member's address: an HTTP server
    (it waits for its client to speak, then answers; it counts its answers) or one that
    greets every connection with a banner of another protocol (SSH)."""

    def __init__(self, kind: str) -> None:
        import http.server
        import threading

        self.answered: list[int] = []
        if kind == "http":
            outer = self

            class Handler(http.server.BaseHTTPRequestHandler):
                def send_error(self, code, message=None, explain=None):
                    outer.answered.append(code)
                    super().send_error(code, message, explain)

                def log_message(self, *args):
                    pass

            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
            self.port = self.server.server_address[1]
            self.close = lambda: (self.server.shutdown(), self.server.server_close())
        else:  # kept open after the banner, as an SSH server waits for ours
            self.port, self.close = greeter(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")


def greeter(greeting: bytes):
    """A TCP listener on 127.0.0.1 that sends ``greeting`` on every connection and then
    says nothing, keeping it open: (port, close)."""
    import socket
    import threading

    sock = socket.create_server(("127.0.0.1", 0))
    conns = []

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
                conn.sendall(greeting)
            except OSError:
                return
            conns.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1], lambda: [s.close() for s in [sock, *conns]]


@pytest.mark.parametrize("kind", ["http", "banner"])
def test_a_member_address_where_no_cachefs_peer_listens(mounts, bucket, s3, proxy, tmp_path,
                                                        kind):
    """A --peers entry whose port holds something else.  An HTTP server waits for its
    client to speak: every attempt (the start-up check, a read of its chunks once per
    10 s, each preload, status, free, stats --nodes) waited out the 2 s peer timeout for a
    hello, and stats --nodes said only "timed out".  A banner was a `protocol` error, which
    commands take for a node that answered: a preload failed the chunks it owns instead of
    sending them to its successor.  Both are now known in a round trip as `not_peer`: down,
    like a node that refuses connections (readers skip it for 10 s, commands say so)."""
    import hashlib
    import json

    from cachefs.chunks.ids import chunk_id
    from cachefs.cluster.ring import HashRing

    ring = HashRing(["n0", "n1"])
    for salt in range(100):  # a file of which n1 owns a chunk, read before the preload
        data = random.Random(salt).randbytes(3 * CHUNK)
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        if any(ring.owner(chunk_id(bucket, "r.bin", etag, CHUNK, i)) == "n1"
               for i in range(3)):
            break
    s3.put_object(Bucket=bucket, Key="r.bin", Body=data)
    files = put_files(s3, bucket, {f"np/{i}.bin": 3 * CHUNK for i in range(4)}, seed=17)
    fake = NotAPeer(kind)
    try:
        port = free_port()
        addr = f"127.0.0.1:{fake.port}"
        m = mounts(f"s3://{bucket}", name="n0", env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}",
                          "--peers", f"n0=127.0.0.1:{port},n1={addr}"))
        assert read_all(m, {"r.bin": data}) == {"r.bin": data}
        assert cluster_stats(m)["peer_errors"]["n1"]["not_peer"] >= 1
        lst = tmp_path / "np.txt"
        lst.write_text("np\n")
        why = f"node n1 unreachable: connect to {addr}: not a cachefs peer (it sent b'"

        r = cli("preload", "--file-list", str(lst), "--mount", str(m.mp), "--json")
        assert r.returncode == 0 and f"warning: {why}" in r.stderr, r.stderr
        res = json.loads(r.stdout)  # n1's chunks went to n0, its successor
        assert res["fetched_chunks"] == 12 and res["nodes"]["n0"]["fallback_for"]["n1"] > 0
        r = cli("status", "--file-list", str(lst), "--mount", str(m.mp), "--json")
        assert r.returncode == 1 and r.stderr.startswith(f"cachefs: {why}"), r.stderr
        st = json.loads(r.stdout)
        assert st["cached_bytes"] == st["total_bytes"] == 12 * CHUNK
        assert [u["node"] for u in st["unreachable"]] == ["n1"]
        assert read_all(m, files) == files
        r = cli("stats", "--nodes", "--mount", str(m.mp))
        assert r.returncode == 1 and r.stderr.startswith(f"cachefs: {why}"), r.stderr

        cl = cluster_stats(m)
        tried = cl["client"]["peers"][addr]
        assert tried["connects"] == 0 and set(tried["errors"]) == {"not_peer"}
        # the start-up check, the read, preload, status, stats --nodes
        assert tried["errors"]["not_peer"] >= 5
        assert set(cl["peer_errors"]["n1"]) == {"not_peer"}
        if kind == "http":  # it answered every attempt: none waited for a hello
            assert fake.answered == [400] * tried["errors"]["not_peer"]
    finally:
        fake.close()


def test_the_peers_of_a_chunk_get_one_requests_time_in_all(mounts, bucket, s3, proxy,
                                                          tmp_path):
    """An owner that accepts and never answers (its event loop stuck) timed out, and then
    its successor, reading a slow S3 for the chunk, took nearly as long again: the read
    waited twice its bound (68 s with the defaults) before it read S3 itself.  The peers
    of a chunk now get one request's time in all (the queue wait, a peer timeout, and the
    request timeout, a peer timeout and the S3 timeout: here 0.5 + 0.5 + 3 s), then the
    read goes to S3."""
    import hashlib
    import os

    from cachefs.chunks.ids import chunk_id
    from cachefs.cluster.protocol import encode_hello
    from cachefs.cluster.ring import HashRing

    ring = HashRing(["n0", "n1", "fz"])
    for seed in range(1, 10_000):
        key, data = f"fz/{seed}.bin", random.Random(seed).randbytes(CHUNK // 2)
        cid = chunk_id(bucket, key, f'"{hashlib.md5(data).hexdigest()}"', CHUNK, 0)
        if ring.preference(cid, 2) == ["fz", "n1"]:
            break
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[s3]\nrequest_timeout = "3s"\nmax_attempts = 1\n'
                   '[cluster]\npeer_timeout = "0.5s"\n')
    silent, close = greeter(encode_hello(os.urandom(16)))
    try:
        ms = start_cluster(mounts, bucket, 2, config=str(cfg),
                           more_peers=(f"fz=127.0.0.1:{silent}",))
        ms[0].path(key).stat()
        proxy.reset()
        # fz times out after 3.5 s of the 4 s: too little is left for n1, which would read
        # S3 for it and answer 1.5 s later (within its own limit for an answer, the S3
        # timeout less a peer timeout)
        proxy.faults(delay=1.5, count=-1)
        assert ms[0].path(key).read_bytes() == data
        proxy.clear_faults()
        assert gets(proxy) == 1  # this node's own; n1's before, the read waiting past 4 s
        assert cluster_stats(ms[1])["requests_served"] == 0  # n1 was not asked
        st = cluster_stats(ms[0])
        assert st["budget_spent"] == 1, json.dumps({k: v for k, v in st.items()
                                                    if k not in ("members", "client")})
        assert st["peer_errors"].get("fz") == {"timeout": 1}, st["peer_errors"]
    finally:
        close()


def test_stats_nodes_names_a_member_that_says_hello_and_then_nothing(mounts, bucket, tmp_path,
                                                                     s3):
    """A member that accepts, says the cachefs hello and then never answers (a peer whose
    event loop is stuck): every request to it is bounded (PeerClient's request timeout;
    stats --nodes gives each node 5 peer timeouts, 10 s, as status does), and stats --nodes
    names it with its address and that limit (it said only "timed out")."""
    import os

    from cachefs.cluster.protocol import encode_hello

    silent, close = greeter(encode_hello(os.urandom(16)))
    addr = f"127.0.0.1:{silent}"
    try:
        port = free_port()
        m = mounts(f"s3://{bucket}", name="n0", env={"CACHEFS_PEER_SECRET": SECRET},
                   extra=("--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}",
                          "--peers", f"n0=127.0.0.1:{port},n1={addr}"))
        r = cli("stats", "--nodes", "--mount", str(m.mp))
        assert r.returncode == 1, r.stderr
        assert r.stderr.splitlines() == [
            f"cachefs: node n1 unreachable: request to {addr} timed out after 10s"], r.stderr
        assert "    n0           " in r.stdout, r.stdout
        # trace --cold asks every member to drop the chunks: n1 is given up after 5 peer
        # timeouts, as status and free give it up (it waited the 32 s request timeout);
        # the read then asks n1 for a copy of a chunk n0 owns: 2 peer timeouts
        import hashlib

        from cachefs.chunks.ids import chunk_id
        from cachefs.cluster.ring import HashRing

        body = b"t" * 1000  # a chunk n0 owns: its read asks nobody
        etag = f'"{hashlib.md5(body).hexdigest()}"'
        key = next(k for k in (f"t{i}.bin" for i in range(100))
                   if HashRing(["n0", "n1"]).owner(chunk_id(bucket, k, etag, CHUNK, 0)) == "n0")
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        t0 = time.monotonic()
        r = cli("trace", str(m.path(key)), "--cold")
        # 10 s for the drop, 4 s for the read's hand-off probe of n1, its successor (it
        # waited the request timeout too: 42 s in all)
        assert time.monotonic() - t0 < 25
        assert r.returncode == 1, r.stderr
        assert "node n1 (PeerError: request to " in r.stderr and "timed out after 10s" in \
            r.stderr, r.stderr
    finally:
        close()


def test_reads_queued_here_for_a_busy_owner_do_not_make_it_unhealthy(mounts, bucket, s3,
                                                                      proxy):
    """Cold reads of chunks one owner holds queued behind this node's few connections to
    it, inside the request timeout: the last ones timed out, the healthy owner was marked
    unhealthy (readers skipped it) and its chunks were fetched from S3 twice. A status or
    `stats --nodes` queued there too, and called the owner unreachable. And an owner whose
    S3 read needed a retry was timed out by its requester the same way."""
    ms = start_cluster(mounts, bucket, 2, extra_for={n: ("--s3-timeout", "6s")
                                                    for n in ("n0", "n1")})
    files = put_owned_files(s3, bucket, 24, ["n0", "n1"], "n1")  # 8 more than connections
    slow = put_owned_files(s3, bucket, 1, ["n0", "n1"], "n1", stem="slow")
    for k in [*files, *slow]:
        ms[0].path(k).stat()
    proxy.reset()
    proxy.faults(delay=2.0, count=-1)
    with cf.ThreadPoolExecutor(1) as ex:
        reading = ex.submit(read_each, ms[0], files)
        # every connection to n1 in use (16 GETs at n1), reads queued behind them
        wait_for(lambda: proxy.stats(settle=0)["inflight"] >= 16, 20, "n1's connections busy")
        r = cli("stats", "--nodes", "--mount", str(ms[0].mp))
        assert r.returncode == 0, r.stderr  # (it said: node n1 unreachable ... timed out)
        assert reading.result(timeout=60) == files
    proxy.clear_faults()
    st = cluster_stats(ms[0])
    assert "timeout" not in st["peer_errors"].get("n1", {}), st["peer_errors"]
    assert st["members"]["n1"]["healthy"], st
    assert gets(proxy) == 24  # each chunk once: by n1, or by n0 when no connection came free
    # an owner whose S3 read takes a retry answers before its requester gives up on it
    key = next(iter(slow))
    proxy.reset()
    proxy.faults(delay=7.0, count=2, key_filter=key)  # n1's first attempt times out
    assert ms[0].path(key).read_bytes() == slow[key]
    st = cluster_stats(ms[0])
    assert "timeout" not in st["peer_errors"].get("n1", {}), st["peer_errors"]
    assert st["members"]["n1"]["healthy"], st
    assert cluster_stats(ms[1])["serve_errors"].get("slow") == 1


def test_what_a_node_finds_wrong_with_its_cluster_at_start_is_said(mounts, bucket, s3, proxy,
                                                                   tmp_path):
    """A node whose peer secret the others refuse, or that mounts other buckets than they
    do, started without a word (its log said "unauthorized" at INFO, per read) and every
    node read from S3 what another held. A --peers entry for the node itself that does not
    match its --peer-listen started too, and no node could reach it."""
    ms = start_cluster(mounts, bucket, 3, one_by_one=True,
                       env_for={"n2": {"CACHEFS_PEER_SECRET": "another-secret"}},
                       source_for={"n1": f"s3://{bucket}/elsewhere/"})
    log1, log2 = ms[1].log_text(), ms[2].log_text()
    assert "WARNING" in log2 and "node n0 (127.0.0.1:" in log2, log2
    assert "refuses this node's peer secret: give every node the same CACHEFS_PEER_SECRET" \
        in log2, log2
    assert "node n0 (127.0.0.1:" in log1 and f"mounts s3://{bucket}/, this node " \
        f"s3://{bucket}/elsewhere/" in log1, log1
    # --peers names this node where another node of its id listens: refused, one line
    peers = cluster_stats(ms[0])["members"]
    listed = ",".join(f"{n}={v['address']}" for n, v in sorted(peers.items()))
    (tmp_path / "x").mkdir()
    r = cli("mount", f"s3://{bucket}", str(tmp_path / "x"), "--foreground",
            "--cache-dir", str(tmp_path / "xc"), "--cache-size", "64MiB",
            "--endpoint-url", proxy.url, "--node-id", "n0",
            "--peer-listen", f"127.0.0.1:{free_port()}", "--peers", listed,
            env={"CACHEFS_PEER_SECRET": SECRET})
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith(
        "cachefs: error: another node answers as n0 at 127.0.0.1:"), r.stderr
    assert r.stderr.splitlines()[-1].endswith(": give every node its own --node-id")


def test_a_request_naming_no_text_is_a_bad_request(mounts, bucket, s3, proxy):
    """A chunk request whose key holds a lone surrogate ("\\ud800" in its JSON) raised
    UnicodeEncodeError where a fetch was under way: the connection was dropped with a
    traceback in the log instead of an answer."""
    files = put_files(s3, bucket, {"a.bin": CHUNK}, seed=3)
    ms = start_cluster(mounts, bucket, 2)
    ms[0].path("a.bin").stat()
    proxy.faults(delay=3.0, count=1)
    addr = cluster_stats(ms[0])["listen"]
    with cf.ThreadPoolExecutor(1) as ex:
        reading = ex.submit(ms[0].path("a.bin").read_bytes)  # a fetch under way on n0
        wait_for(lambda: ms[0].stats()["in_flight_fetches"] > 0, 10, "a fetch under way")

        async def ask() -> str:
            chunk = {"mount": "", "bucket": bucket, "key": "\ud800", "etag": '"x"',
                     "size": 10, "chunk_size": CHUNK, "index": 0}
            # (json.dumps writes the lone surrogate as the escape a peer may send)
            raw = json.dumps({"op": "get", "chunk": chunk, "trace": {}}).encode()
            async with PeerClient(SECRET.encode()) as c:
                with pytest.raises(PeerError) as e:
                    await c._request(addr, raw)
                return e.value.reason

        assert trio.run(ask) == "remote"  # answered (it was: connection dropped)
        assert cluster_stats(ms[0])["serve_errors"].get("bad_request") == 1
        assert reading.result(timeout=30) == files["a.bin"]
    assert "Traceback" not in ms[0].log_text()


def test_a_chunk_request_of_another_chunk_size_is_refused(mounts, bucket, s3, proxy):
    """Only the start-up check compared chunk sizes: a request naming another (a node
    started with another --chunk-size while this one was away) was served, fetching and
    keeping a second set of chunks of its size (up to 256 MiB a request) from S3."""
    s3.put_object(Bucket=bucket, Key="c.bin", Body=b"c" * 1000)
    etag = s3.head_object(Bucket=bucket, Key="c.bin")["ETag"]
    ms = start_cluster(mounts, bucket, 2)
    addr = cluster_stats(ms[0])["listen"]
    proxy.reset()

    async def ask() -> PeerError:
        chunk = {"mount": "", "bucket": bucket, "key": "c.bin", "etag": etag,
                 "size": 1000, "chunk_size": 2 * CHUNK, "index": 0}
        async with PeerClient(SECRET.encode()) as c:
            with pytest.raises(PeerError) as e:
                await c.get(addr, chunk, {"node": "n1"})
            return e.value

    e = trio.run(ask)
    assert "chunk size" in str(e), e
    assert gets(proxy) == 0 and ms[0].stats()["cache"]["chunks"] == 0  # (1 and 1)


def test_a_peer_asking_with_a_wrong_size_fails_its_own_request_only(mounts, bucket, s3,
                                                                     proxy):
    """A chunk request naming another size than the object's failed the owner's GET as a
    change (right), and the owner then failed its own reads of that version for 60 s
    without a GET; a size above the object's was retried 6 times as a bad Content-Range."""
    ms = start_cluster(mounts, bucket, 2)
    files = put_owned_files(s3, bucket, 1, ["n0", "n1"], "n0")
    ((key, data),) = files.items()
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"]
    addr = cluster_stats(ms[0])["listen"]
    ms[0].path(key).stat()

    async def ask(size: int) -> PeerError:
        chunk = {"mount": "", "bucket": bucket, "key": key, "etag": etag,
                 "size": size, "chunk_size": CHUNK, "index": 0}
        async with PeerClient(SECRET.encode()) as c:
            with pytest.raises(PeerError) as e:
                await c.get(addr, chunk, {"node": "n1"})
            return e.value

    proxy.reset()
    for size in (len(data) - 1, len(data) + 1):
        assert "changed" in str(trio.run(ask, size))
    assert gets(proxy) == 2  # one GET each, no retries
    assert ms[0].path(key).read_bytes() == data  # the owner's own read of the version
    assert gets(proxy) == 3
    # the chunk cached: a request of it with a wrong size took its good file for damaged,
    # and dropped it (pinned or not)
    assert "changed" in str(trio.run(ask, len(data) - 1))
    c = ms[0].counters()
    assert c.get("ssd_length_mismatches") == 1 and "chunks_corrupt" not in c, c
    assert ms[0].stats()["cache"]["chunks"] == 1
    fd = os.open(ms[0].path(key), os.O_RDONLY | os.O_DIRECT)  # (past the page cache)
    try:
        assert os.pread(fd, 1 << 20, 0) == data
    finally:
        os.close(fd)
    # (the wrong size failed at once, as that version's GET failed moments ago), and the
    # owner's read came from its SSD
    assert gets(proxy) == 3


def test_a_restarting_owner_serves_what_its_ssd_holds_while_it_starts(mounts, bucket, s3,
                                                                       proxy):
    """A node starting up (it checks its peers first: a peer timeout when one is silent)
    answered its peers' requests "still starting", and each of those reads went to S3 though
    its SSD held the chunk: a rolling restart downloaded the restarted node's share again.
    It serves what its SSD holds from its first moment now."""
    import os
    import socket

    from cachefs.cluster.protocol import encode_hello

    silent, close = greeter(encode_hello(os.urandom(16)))
    try:
        ms = start_cluster(mounts, bucket, 3, more_peers=(f"n3=127.0.0.1:{silent}",))
        files = put_owned_files(s3, bucket, 4, ["n0", "n1", "n2", "n3"], "n0")
        assert read_all(ms[1], files) == files  # n0 fetches them and keeps them
        port0 = int(ms[0].extra[ms[0].extra.index("--peer-listen") + 1].rpartition(":")[2])
        ms[0].stop()
        proxy.reset()

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port0), timeout=0.2).close()
                return True
            except OSError:
                return False

        with cf.ThreadPoolExecutor(1) as ex:
            starting = ex.submit(ms[0].start)
            wait_for(listening, 30, "n0 to listen for peers")
            got = read_all(ms[2], files)  # (n2 never read them: no copy, no page cache)
            during = not starting.done()
            starting.result(timeout=60)
        assert got == files
        assert during, "n0 started before the reads: this tested nothing"
        assert gets(proxy) == 0
        assert cluster_stats(ms[0])["requests_served"] == len(files)
    finally:
        close()
