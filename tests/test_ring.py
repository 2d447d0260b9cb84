import hashlib
import os
import random
import subprocess
import sys
import time
from collections import Counter

import pytest

from cachefs.cluster.ring import DEFAULT_VNODES, HashRing, chunk_point, node_points


def _ids(n, seed=1234):
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


def _nodes(n, prefix="node-"):
    return [f"{prefix}{i:03d}" for i in range(n)]


IDS_200K = _ids(200_000)
IDS_50K = IDS_200K[:50_000]


def test_build_100_nodes_is_fast():
    # Best of three, so a busy CI machine does not make this flaky.
    elapsed = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ring = HashRing(_nodes(100))
        elapsed = min(elapsed, time.perf_counter() - t0)
    assert elapsed < 0.5, elapsed
    assert len(ring) == 100
    assert ring.vnodes == DEFAULT_VNODES


def test_balance_100_nodes():
    ring = HashRing(_nodes(100))
    counts = Counter(ring.owner(c) for c in IDS_200K)
    assert set(counts) == ring.nodes
    mean = len(IDS_200K) / 100
    assert max(counts.values()) / mean <= 1.15
    # The exact arc shares (no sampling noise) are tighter still.
    shares = ring.arc_shares()
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert max(shares.values()) * 100 <= 1.12


@pytest.mark.parametrize("n", [3, 10, 50])
def test_add_node_moves_about_one_over_n_plus_one(n):
    base = HashRing(_nodes(n))
    grown = base.with_node("newcomer")
    moved = 0
    for c in IDS_50K:
        before, after = base.owner(c), grown.owner(c)
        if before != after:
            moved += 1
            # Only the new node takes chunks over; nothing shuffles elsewhere.
            assert after == "newcomer"
    expected = len(IDS_50K) / (n + 1)
    assert abs(moved - expected) / expected <= 0.20, (moved, expected)


@pytest.mark.parametrize("n", [3, 10, 50])
def test_remove_node_moves_only_its_chunks(n):
    base = HashRing(_nodes(n))
    victim = _nodes(n)[n // 2]
    shrunk = base.without_node(victim)
    assert victim not in shrunk
    for c in IDS_50K:
        before, after = base.owner(c), shrunk.owner(c)
        if before == victim:
            assert after != victim
            # A removed node's chunks go to its next fallback.
            assert after == base.preference(c, 2)[1]
        else:
            assert after == before


def test_add_then_remove_is_identity():
    base = HashRing(_nodes(10))
    back = base.with_node("x").without_node("x")
    assert back == base
    for c in IDS_200K[:5000]:
        assert back.owner(c) == base.owner(c)


def test_with_and_without_are_idempotent_and_immutable():
    base = HashRing(["a", "b"])
    assert base.with_node("a") is base
    assert base.without_node("zzz") is base
    bigger = base.with_node("c")
    assert base.nodes == frozenset({"a", "b"})
    assert bigger.nodes == frozenset({"a", "b", "c"})
    with pytest.raises(AttributeError):
        base.foo = 1


def test_preference_lists():
    ring = HashRing(_nodes(20))
    for c in IDS_200K[:2000]:
        pref = ring.preference(c, 5)
        assert len(pref) == 5
        assert len(set(pref)) == 5
        assert pref[0] == ring.owner(c)
        # Longer lists extend shorter ones.
        assert ring.preference(c, 3) == pref[:3]
    c = IDS_200K[0]
    assert sorted(ring.preference(c, 100)) == sorted(ring.nodes)
    assert ring.preference(c, 0) == []
    assert ring.preference(c, 1) == [ring.owner(c)]


def test_preference_second_entry_is_owner_without_first():
    ring = HashRing(_nodes(10))
    without = {n: ring.without_node(n) for n in ring.nodes}
    for c in IDS_200K[:2000]:
        first, second = ring.preference(c, 2)
        assert without[first].owner(c) == second


def test_empty_ring_and_bad_input():
    empty = HashRing([])
    assert len(empty) == 0
    with pytest.raises(LookupError):
        empty.owner(b"x" * 16)
    with pytest.raises(LookupError):
        empty.preference(b"x" * 16, 2)
    with pytest.raises(TypeError):
        HashRing("abc")
    with pytest.raises(ValueError):
        HashRing(["a"], vnodes=0)
    with pytest.raises(ValueError):
        HashRing(["a", ""])


def test_single_node_and_duplicates():
    ring = HashRing(["only", "only"])
    assert ring.nodes == frozenset({"only"})
    assert ring.owner(b"\x00" * 16) == "only"
    assert ring.preference(b"\x00" * 16, 3) == ["only"]


def test_node_order_does_not_matter():
    a = HashRing(["n1", "n2", "n3", "n4"])
    b = HashRing(["n4", "n2", "n1", "n3"])
    assert a == b
    for c in IDS_200K[:2000]:
        assert a.owner(c) == b.owner(c)
        assert a.preference(c, 4) == b.preference(c, 4)


# Fixed expectations: if the hash function, the vnode naming, the point of a
# chunk id or DEFAULT_VNODES changes, these break -- which is the point, as
# such a change reshuffles every node's cache.
def test_hash_is_pinned():
    assert node_points("node-000", 1) == [648854977006158088]
    assert chunk_point(bytes(16)) == 15034821391391295848


FIXED_ID = hashlib.blake2b(b"s3://bucket/key@etag#0", digest_size=16).digest()
FIXED_NODES = [f"node-{i:03d}" for i in range(10)]


def test_fixed_owner():
    ring = HashRing(FIXED_NODES)
    assert ring.owner(FIXED_ID) == EXPECTED_OWNER
    assert ring.preference(FIXED_ID, 3) == EXPECTED_PREF


EXPECTED_OWNER = "node-002"
EXPECTED_PREF = ["node-002", "node-009", "node-000"]


def test_deterministic_across_processes():
    code = (
        "import hashlib\n"
        "from cachefs.cluster.ring import HashRing\n"
        f"ring = HashRing({FIXED_NODES!r})\n"
        f"print(ring.preference({FIXED_ID!r}, 3))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        outs.add(out)
    assert outs == {repr(EXPECTED_PREF)}


def test_a_membership_change_built_after_a_later_one_does_not_replace_it(monkeypatch):
    """Two membership changes in a row (etcd's watch and the grace-period sweeper): the ring
    of each is built in a worker thread, and the older one, finished last, replaced the
    newer one, which nothing corrected until the next change. The latest change wins."""
    import threading

    import trio
    import trio.testing

    import cachefs.cluster.node as node_mod
    from cachefs.cluster.node import ClusterNode
    from cachefs.cluster.peer import PeerClient, PeerHealth

    gate = threading.Event()

    def build(nodes):  # the first change's ring takes longer to build
        if len(nodes) == 3:
            gate.wait(10)
        return HashRing(nodes)

    monkeypatch.setattr(node_mod, "HashRing", build)
    node = ClusterNode.__new__(ClusterNode)  # only what a membership change touches
    node.members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}
    node.ring = HashRing(list(node.members))
    node.ring_changes = node._members_seq = 0
    node.peer_errors = {}
    node.health = PeerHealth()
    older = {**node.members, "c": "127.0.0.1:3"}
    newer = {**older, "d": "127.0.0.1:4"}

    async def main():
        async with PeerClient(b"secret") as client, trio.open_nursery() as n:
            node.client = client
            n.start_soon(node._on_members, older)
            await trio.testing.wait_all_tasks_blocked()
            await node._on_members(newer)
            gate.set()

    trio.run(main)
    assert sorted(node.ring.nodes) == ["a", "b", "c", "d"] and node.members == newer


def test_a_member_that_leaves_takes_its_error_counters_with_it():
    """Nodes that left kept their error counters (cluster stats, /metrics series) and
    unhealthy marks for good: with node ids that change at every start (a scheduler's pod
    names), they grew without a bound."""
    import trio

    from cachefs.cluster.node import ClusterNode
    from cachefs.cluster.peer import PeerClient, PeerHealth

    node = ClusterNode.__new__(ClusterNode)  # only what a membership change touches
    node.members = {"a": "127.0.0.1:1", "b": "127.0.0.1:2", "c": "127.0.0.1:3"}
    node.ring = HashRing(list(node.members))
    node.ring_changes = node._members_seq = 0
    node.peer_errors = {}
    node.health = PeerHealth()

    async def main():
        async with PeerClient(b"secret") as client:
            node.client = client
            for n in ("b", "c"):
                node._count_error(n, "timeout")
                node.health.mark_bad(n, "timeout")
            await node._on_members({"a": "127.0.0.1:1", "c": "127.0.0.1:3"})
            # a request to b that was under way fails after it left: not counted again
            node._count_error("b", "closed")
            node._mark_bad("b", "closed")
            return node.health.statistics(), node.health.is_healthy("b")

    health, b_healthy = trio.run(main)
    assert list(node.peer_errors) == ["c"] and list(health) == ["c"] and b_healthy
