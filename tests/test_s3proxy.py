"""Tests of the counting / fault-injecting S3 proxy (tests/s3proxy.py) and the
process helpers in tests/s3env.py, against a real moto server."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import os
import random
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import BotoCoreError, ClientError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s3env  # noqa: E402

BUCKET = "proxy-test"
BIG = "dir/big object.bin"  # space + slash: exercises URL-decoding of keys
SMALL = "small.txt"


@pytest.fixture(scope="module")
def _procs():
    moto = s3env.start_moto()
    proxy = s3env.start_proxy(moto.url)
    try:
        yield moto, proxy
    finally:
        proxy.stop()
        moto.stop()


@pytest.fixture(scope="module")
def big_data(_procs):
    moto, _ = _procs
    direct = s3env.s3_client(moto.url)
    direct.create_bucket(Bucket=BUCKET)
    data = random.Random(42).randbytes(5 * 1024 * 1024)
    direct.put_object(Bucket=BUCKET, Key=BIG, Body=data)
    direct.put_object(Bucket=BUCKET, Key=SMALL, Body=b"hello world\n" * 100)
    return data


@pytest.fixture
def proxy(_procs, big_data):
    _, p = _procs
    p.reset()
    yield p
    p.reset()


@pytest.fixture
def s3(proxy):
    return s3env.s3_client(proxy.url, retries=1)  # no retries: see every fault


def presigned_path(proxy, key):
    url = s3env.s3_client(proxy.url).generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600
    )
    return url[len(proxy.url) :]


def raw_get(proxy, key, headers=None):
    """GET via http.client: returns (status, headers, body, error)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", presigned_path(proxy, key), headers=headers or {})
        resp = conn.getresponse()
        try:
            return resp.status, dict(resp.getheaders()), resp.read(), None
        except http.client.IncompleteRead as e:
            return resp.status, dict(resp.getheaders()), e.partial, e
    finally:
        conn.close()


# ------------------------------------------------------------------ passthrough


def test_processes_have_urls_and_pids(_procs):
    moto, proxy = _procs
    assert moto.alive() and proxy.alive()
    assert moto.url.startswith("http://127.0.0.1:") and proxy.url.startswith("http://127.0.0.1:")
    assert proxy.upstream == moto.url


def test_passthrough_byte_exact(proxy, s3, big_data):
    # put a fresh 5 MiB random object *through* the proxy
    data = os.urandom(5 * 1024 * 1024)
    s3.put_object(Bucket=BUCKET, Key="via-proxy/rand.bin", Body=data)
    full = s3.get_object(Bucket=BUCKET, Key="via-proxy/rand.bin")
    assert full["ContentLength"] == len(data)
    assert hashlib.sha256(full["Body"].read()).digest() == hashlib.sha256(data).digest()
    r = s3.get_object(Bucket=BUCKET, Key="via-proxy/rand.bin", Range="bytes=1000-3000999")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["ContentRange"] == f"bytes 1000-3000999/{len(data)}"
    assert r["Body"].read() == data[1000:3001000]
    # same object as seen directly at moto
    moto_client = s3env.s3_client(proxy.upstream)
    assert moto_client.head_object(Bucket=BUCKET, Key="via-proxy/rand.bin")["ETag"] == full["ETag"]
    tail = s3.get_object(Bucket=BUCKET, Key=BIG, Range="bytes=-100")["Body"].read()
    assert tail == big_data[-100:]


def test_concurrent_requests(proxy, big_data):
    s3 = s3env.s3_client(proxy.url, max_pool_connections=40)
    mib = 1024 * 1024

    def fetch(i):
        start = (i * 131072) % (4 * mib)
        r = s3.get_object(Bucket=BUCKET, Key=BIG, Range=f"bytes={start}-{start + mib - 1}")
        return start, r["Body"].read()

    with concurrent.futures.ThreadPoolExecutor(40) as ex:
        results = list(ex.map(fetch, range(40)))
    for start, body in results:
        assert body == big_data[start : start + mib]
    st = proxy.stats()
    assert st["ops"]["GetObject"] == 40
    assert st["get_bytes"] == 40 * mib
    assert st["max_inflight"] >= 2
    assert st["inflight"] == 0


# ------------------------------------------------------------------ counting


def test_counts_per_op_and_key(proxy, s3, big_data):
    s3.put_object(Bucket=BUCKET, Key="count/x", Body=b"x" * 10)
    s3.head_object(Bucket=BUCKET, Key=SMALL)
    for _ in range(3):
        s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    s3.get_object(Bucket=BUCKET, Key=BIG, Range="bytes=0-99")["Body"].read()
    s3.list_objects_v2(Bucket=BUCKET, Prefix="dir/")
    s3.list_objects(Bucket=BUCKET, Prefix="dir/")  # v1 listing counts too
    s3.list_buckets()

    st = proxy.stats()
    assert st["ops"] == {
        "GetObject": 4,
        "HeadObject": 1,
        "ListObjects": 2,
        "PutObject": 1,
        "other": 1,
    }
    assert st["total"] == 9
    assert st["other_ops"] == {"ListBuckets": 1}
    assert st["get_by_key"] == {SMALL: 3, BIG: 1}
    assert st["get_by_bucket_key"] == {f"{BUCKET}/{SMALL}": 3, f"{BUCKET}/{BIG}": 1}
    assert st["head_by_key"] == {SMALL: 1}
    assert st["get_bytes"] == 3 * 1200 + 100
    assert st["get_bytes_by_key"] == {SMALL: 3600, BIG: 100}
    assert [BIG, "bytes=0-99"] in st["get_ranges"]
    assert st["faults_injected"] == 0
    assert proxy.gets() == 4 and proxy.gets(SMALL) == 3


def test_reset_clears_counters_and_faults(proxy, s3):
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    proxy.faults(persistent_status=500)
    with pytest.raises(ClientError):
        s3.get_object(Bucket=BUCKET, Key=SMALL)
    assert proxy.stats()["faults_injected"] == 1
    proxy.reset()
    st = proxy.stats()
    assert st["total"] == 0 and st["ops"]["GetObject"] == 0 and st["get_by_key"] == {}
    assert st["faults_injected"] == 0 and st["armed_faults"] == []
    assert s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read().startswith(b"hello")


# ------------------------------------------------------------------ faults


def test_status_fault_count(proxy, s3):
    proxy.faults(status=503, code="SlowDown", count=2)
    for _ in range(2):
        with pytest.raises(ClientError) as ei:
            s3.get_object(Bucket=BUCKET, Key=SMALL)
        assert ei.value.response["Error"]["Code"] == "SlowDown"
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read().startswith(b"hello")
    st = proxy.stats()
    assert st["faults_injected"] == 2 and st["faults_by_kind"] == {"status": 2}
    assert st["ops"]["GetObject"] == 3
    assert st["status_counts"] == {"503": 2, "200": 1}
    assert st["get_bytes"] == 1200  # error bodies are not counted as data


def test_status_fault_raw_xml(proxy):
    proxy.faults(status=503, code="SlowDown")
    status, headers, body, err = raw_get(proxy, SMALL)
    assert err is None and status == 503
    assert headers["Content-Type"] == "application/xml"
    assert int(headers["Content-Length"]) == len(body)
    assert b"<Error><Code>SlowDown</Code><Message>" in body


def test_boto_retries_through_transient_503(proxy):
    s3 = s3env.s3_client(proxy.url, retries=5)
    proxy.faults(status=503, count=2)
    assert s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read().startswith(b"hello")
    st = proxy.stats()
    assert st["ops"]["GetObject"] == 3 and st["faults_injected"] == 2


def test_faults_apply_only_to_getobject_by_default(proxy, s3):
    proxy.faults(persistent_status=503)
    s3.put_object(Bucket=BUCKET, Key="ops/p", Body=b"p")
    s3.head_object(Bucket=BUCKET, Key="ops/p")
    s3.list_objects_v2(Bucket=BUCKET, Prefix="ops/")
    with pytest.raises(ClientError):
        s3.get_object(Bucket=BUCKET, Key="ops/p")
    assert proxy.stats()["faults_injected"] == 1


def test_ops_selects_other_operations(proxy, s3):
    proxy.faults(status=500, ops=["HeadObject", "ListObjects"], count=2)
    with pytest.raises(ClientError) as ei:
        s3.head_object(Bucket=BUCKET, Key=SMALL)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    with pytest.raises(ClientError) as ei:
        s3.list_objects_v2(Bucket=BUCKET)
    assert ei.value.response["Error"]["Code"] == "InternalError"
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    s3.head_object(Bucket=BUCKET, Key=SMALL)
    assert proxy.stats()["faults_injected"] == 2


def test_key_filter(proxy, s3):
    proxy.faults(persistent_status=500, key_filter="big")
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    for _ in range(3):
        with pytest.raises(ClientError):
            s3.get_object(Bucket=BUCKET, Key=BIG, Range="bytes=0-9")
    st = proxy.stats()
    assert st["faults_injected"] == 3
    assert st["get_by_key"] == {SMALL: 1, BIG: 3}


def test_persistent_status_until_reset(proxy, s3):
    proxy.faults(persistent_status=500)
    for _ in range(5):
        with pytest.raises(ClientError) as ei:
            s3.get_object(Bucket=BUCKET, Key=SMALL)
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert proxy.stats()["faults_injected"] == 5
    proxy.reset()
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()


def test_clear_faults_keeps_counters(proxy, s3):
    proxy.faults(persistent_status=500)
    with pytest.raises(ClientError):
        s3.get_object(Bucket=BUCKET, Key=SMALL)
    assert len(proxy.armed()) == 1
    proxy.clear_faults()
    assert proxy.armed() == []
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    st = proxy.stats()
    assert st["ops"]["GetObject"] == 2 and st["faults_injected"] == 1


def _rate_pattern(proxy, s3, n=60):
    proxy.reset()
    proxy.faults(status=503, rate=0.3, seed=1)
    pattern = []
    for _ in range(n):
        try:
            s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
            pattern.append(0)
        except ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            pattern.append(1)
    return pattern


def test_rate_fault_is_deterministic(proxy, s3):
    a = _rate_pattern(proxy, s3)
    assert proxy.stats()["faults_injected"] == sum(a)
    b = _rate_pattern(proxy, s3)
    assert a == b
    assert 5 <= sum(a) <= 35  # ~30% of 60
    # matches Python's RNG with the same seed
    rng = random.Random(1)
    assert a == [int(rng.random() < 0.3) for _ in range(60)]


def test_extra_bytes(proxy, s3, big_data):
    proxy.faults(extra_bytes=7)
    status, headers, body, err = raw_get(proxy, BIG, {"Range": "bytes=0-999"})
    assert status == 206 and int(headers["Content-Length"]) == 1007 and err is None
    assert body == big_data[:1000] + b"J" * 7
    status, headers, body, err = raw_get(proxy, BIG, {"Range": "bytes=0-999"})
    assert int(headers["Content-Length"]) == 1000 and body == big_data[:1000]


def test_truncate(proxy, s3, big_data):
    proxy.faults(truncate=2)
    # raw client: Content-Length as upstream, half the body, then EOF
    status, headers, body, err = raw_get(proxy, BIG, {"Range": "bytes=0-999999"})
    assert status == 206 and int(headers["Content-Length"]) == 1_000_000
    assert isinstance(err, http.client.IncompleteRead)
    assert body == big_data[:500_000]
    # boto3: reading the body fails (or at the very least comes back short)
    try:
        got = s3.get_object(Bucket=BUCKET, Key=BIG)["Body"].read()
    except Exception as e:  # IncompleteReadError / ProtocolError / ResponseStreamingError
        assert "ncomplete" in repr(e) or "closed" in repr(e).lower() or "Protocol" in repr(e), repr(
            e
        )
    else:
        assert len(got) < len(big_data)
    # fault exhausted: next read is whole
    assert s3.get_object(Bucket=BUCKET, Key=BIG)["Body"].read() == big_data
    st = proxy.stats()
    assert st["faults_injected"] == 2
    assert st["get_bytes"] == 500_000 + len(big_data) // 2 + len(big_data)


def test_error_body_200(proxy, s3, big_data):
    proxy.faults(error_body_200=2)
    r = s3.get_object(Bucket=BUCKET, Key=SMALL)
    body = r["Body"].read()
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert body.startswith(b"<?xml") and b"<Error><Code>InternalError</Code>" in body
    assert r["ContentLength"] == len(body)
    r = s3.get_object(Bucket=BUCKET, Key=BIG, Range="bytes=0-1048575")
    body = r["Body"].read()
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["ContentRange"] == f"bytes 0-1048575/{len(big_data)}"  # upstream headers kept
    assert b"<Error>" in body and len(body) == r["ContentLength"] < 1048576
    assert s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read().startswith(b"hello")
    assert proxy.stats()["faults_injected"] == 2


def test_delay(proxy, s3):
    proxy.faults(delay=0.6, count=1)
    t0 = time.monotonic()
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    assert time.monotonic() - t0 >= 0.6
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    assert proxy.stats()["faults_injected"] == 1  # (the second GET was not delayed)


def test_stall_mid_body(proxy, big_data):
    proxy.faults(stall_mid_body=1.5, count=1)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    path = presigned_path(proxy, BIG)
    try:
        t0 = time.monotonic()
        conn.request("GET", path, headers={"Range": "bytes=0-999999"})
        resp = conn.getresponse()
        t_head = time.monotonic() - t0
        first = resp.read(500_000)
        rest = resp.read()
        t_all = time.monotonic() - t0
    finally:
        conn.close()
    assert first + rest == big_data[:1_000_000]
    # the stall came after the headers: in the body (it starts when the proxy sent them,
    # a moment before this client has read them: 0.809 s after them measured 0.799)
    assert t_head < 1.5 and t_all - t_head >= 1.0
    assert proxy.stats()["faults_injected"] == 1


def test_drop_connection(proxy, s3):
    proxy.faults(drop=1)
    with pytest.raises(BotoCoreError):  # ConnectionClosedError
        s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    assert proxy.stats()["faults_injected"] == 1


def test_skip_then_fail(proxy, s3):
    proxy.faults(status=503, skip=2, count=1)
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    with pytest.raises(ClientError):
        s3.get_object(Bucket=BUCKET, Key=SMALL)
    s3.get_object(Bucket=BUCKET, Key=SMALL)["Body"].read()
    assert proxy.stats()["faults_injected"] == 1


def test_bad_fault_spec_rejected(proxy):
    with pytest.raises(RuntimeError, match="400"):
        proxy.faults(bogus=1)
    with pytest.raises(RuntimeError, match="400"):
        proxy.faults(status=503, truncate=1)
    assert proxy.armed() == []


def test_stop_kills_process():
    moto = s3env.start_moto()
    proxy = s3env.start_proxy(moto.url)
    pids = (moto.pid, proxy.pid)
    proxy.stop()
    moto.stop()
    assert not proxy.alive() and not moto.alive()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by wait(): gone
