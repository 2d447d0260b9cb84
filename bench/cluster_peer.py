"""Warm read throughput through node B: chunks owned by peer A vs B's own SSD.

Two daemons (A, B) on loopback, 8 MiB chunks, moto as S3.  Two 64 MiB objects
whose key names are chosen so that every chunk of X_A is owned by A and every
chunk of X_B by B.  Both are first read by their owner (cold, from moto), then
B reads X_A (peer tier: A's SSD → TCP → B) and X_B (B's SSD), with the page
cache dropped before each timed read, several rounds; finally X_A again
without dropping (kernel page cache, keep_cache=True).

    python bench/cluster_peer.py     (as root: it drops the page cache)

The helpers (peers_spec, cluster_args, pick_key, timed_read, peer_vs_local)
are also used by bench/bench.py's `cluster_3` scenario (3 nodes, s3rver).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cachefs.chunks.ids import chunk_id  # noqa: E402
from cachefs.cluster.ring import HashRing  # noqa: E402

MiB = 1 << 20
CHUNK = 8 * MiB
SIZE = 64 * MiB
SECRET = "bench-secret"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peers_spec(ports: dict[str, int]) -> str:
    """`--peers` value: node id -> peer port on 127.0.0.1."""
    return ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())


def cluster_args(node: str, ports: dict[str, int]) -> tuple[str, ...]:
    """`cachefs mount` arguments of one node of a loopback cluster (the daemon also
    needs CACHEFS_PEER_SECRET in its environment)."""
    return ("--node-id", node, "--peer-listen", f"127.0.0.1:{ports[node]}",
            "--peers", peers_spec(ports))


def pick_key(bucket, etag, ring, owner, prefix, size: int = SIZE, chunk: int = CHUNK,
             tries: int = 1_000_000) -> str:
    """A key `prefix-N.bin` whose every chunk (object of `size` bytes, ETag `etag`)
    is owned by `owner` on `ring`."""
    n = (size + chunk - 1) // chunk
    for i in range(tries):
        key = f"{prefix}-{i}.bin"
        if all(ring.owner(chunk_id(bucket, key, etag, chunk, j)) == owner for j in range(n)):
            return key
    raise RuntimeError(f"no key with all {n} chunks on {owner} in {tries} tries")


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def timed_read(path: Path, size: int | None = SIZE) -> float:
    """Read `path` sequentially in 1 MiB reads; MB/s (checks the size unless None)."""
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(MiB)
            if not b:
                break
            n += len(b)
    dt = time.perf_counter() - t0
    if size is not None and n != size:
        raise RuntimeError(f"{path}: read {n} bytes, expected {size}")
    return n / dt / 1e6


def peer_vs_local(peer_path: Path, local_path: Path, rounds: int,
                  size: int | None = SIZE) -> tuple[list[float], list[float]]:
    """Alternating warm reads on one node: a file whose chunks a peer owns, and one
    whose chunks this node owns, page cache dropped before each. MB/s lists."""
    peer, local = [], []
    for _ in range(rounds):
        drop_caches()
        peer.append(timed_read(peer_path, size))
        drop_caches()
        local.append(timed_read(local_path, size))
    return peer, local


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from cachefs_env import Mount, unmount
    from s3env import s3_client, start_moto

    moto = start_moto()
    s3 = s3_client(moto.url)
    bucket = "bench"
    s3.create_bucket(Bucket=bucket)
    data = os.urandom(SIZE)
    etag = s3.put_object(Bucket=bucket, Key="probe", Body=data)["ETag"]
    ring = HashRing(["A", "B"])
    ka = pick_key(bucket, etag, ring, "A", "xa")
    kb = pick_key(bucket, etag, ring, "B", "xb")
    for k in (ka, kb):
        s3.put_object(Bucket=bucket, Key=k, Body=data)
    tmp = Path(tempfile.mkdtemp(prefix="benchcl-"))
    ports = {"A": free_port(), "B": free_port()}
    ms = {}
    for name in ports:
        ms[name] = Mount(tmp, f"s3://{bucket}", moto.url, name=name, cache_size="1GiB",
                         chunk_size="8MiB", env={"CACHEFS_PEER_SECRET": SECRET},
                         extra=cluster_args(name, ports)).start()
    A, B = ms["A"], ms["B"]
    try:
        print(f"cold X_A on A (moto): {timed_read(A.path(ka)):.0f} MB/s")
        print(f"cold X_B on B (moto): {timed_read(B.path(kb)):.0f} MB/s")
        can_drop = drop_caches()
        print("page cache dropped before each timed read:", can_drop)
        peer, local = peer_vs_local(B.path(ka), B.path(kb), 5)
        print("peer  (B reads X_A, owned by A):", " ".join(f"{v:.0f}" for v in peer), "MB/s")
        print("local (B reads X_B, on B's SSD):", " ".join(f"{v:.0f}" for v in local), "MB/s")
        timed_read(B.path(ka))
        pc = [timed_read(B.path(ka)) for _ in range(3)]
        print("kernel page cache (X_A again on B):", " ".join(f"{v:.0f}" for v in pc), "MB/s")
        st = B.stats()
        c = st["cluster"]
        print("B: fetched_from_peers", c["fetched_from_peers"], "bytes_from_peers",
              c["bytes_from_peers"], "cache chunks", st["cache"]["chunks"])
    finally:
        for m in ms.values():
            m.stop()
            unmount(m.mp)
        moto.stop()


if __name__ == "__main__":
    main()
