"""An https endpoint: moto behind TLS with a certificate of a private CA.

cachefs trusts what botocore trusts (AWS_CA_BUNDLE, ``ca_bundle`` in the profile), on
botocore's requests and on the ranged GETs it sends on its own connections."""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
import sys
import time

import pytest
from cachefs_env import cli
from certs import CA
from test_cli import one_line_error

CS = 64 * 1024  # the tests' chunk size (cachefs_env.Mount)


@pytest.fixture(scope="module")
def tls_moto(tmp_path_factory):
    """(url, CA file): a moto server answering on https only."""
    ca = CA(tmp_path_factory.mktemp("tls"))
    cert, key = ca.issue("endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port), "-c", str(cert), "-k", str(key)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=str(ca.pem))
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto did not start on https")
            time.sleep(0.1)
    yield f"https://127.0.0.1:{port}", ca.pem
    proc.terminate()
    proc.wait(10)


def test_https_endpoint_with_private_ca(tls_moto, mounts, tmp_path):
    url, ca = tls_moto
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, verify=str(ca), region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="tls")
    objs = {"first.bin": b"f" * 100, "big.bin": random.randbytes(3 * CS + 7),
            **{f"frames/{i:03d}.jpg": random.randbytes(5000 + i) for i in range(40)}}
    for k, v in objs.items():
        s3.put_object(Bucket="tls", Key=k, Body=v)

    # the CA is not trusted: the mount fails at once, on one line, naming the cause
    mp = tmp_path / "mp"
    mp.mkdir()
    r = cli("mount", "s3://tls", str(mp), "--cache-dir", str(tmp_path / "c"),
            "--cache-size", "64MiB", "--endpoint-url", url, "--s3-timeout", "5s")
    one_line_error(r, "certificate")
    # a CA bundle that cannot be used is named, with what is wrong with it
    not_pem = tmp_path / "not-a-cert.pem"
    not_pem.write_text("hello\n")
    for bundle, why in (("", "it is empty"), (str(tmp_path / "missing.pem"), "No such file"),
                        (str(not_pem), "no PEM certificate")):
        r = cli("mount", "s3://tls", str(mp), "--cache-dir", str(tmp_path / "c"),
                "--cache-size", "64MiB", "--endpoint-url", url, env={"AWS_CA_BUNDLE": bundle})
        one_line_error(r, f"the CA bundle {bundle!r}", why)

    m = mounts("s3://tls", endpoint=url, env={"AWS_CA_BUNDLE": str(ca)})
    for k, v in objs.items():
        assert m.path(k).read_bytes() == v, k
    c = m.counters()
    # every GET but the mount's first went out on cachefs's own TLS connections; moto
    # answers each with "Connection: close", so each had its own
    assert c["s3_get_direct"] == c["s3_get_requests"] - 1 >= 44, c
    assert c["s3_connections"] == c["s3_get_direct"], c
    assert c.get("s3_retries", 0) == 0, c
