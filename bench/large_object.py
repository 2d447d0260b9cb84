"""One large object, four ways, in one run: the figures the foundation issue asks for.

    sudo .venv/bin/python bench/large_object.py [--size 1GiB] [--runs 3]

- s3-direct: plain aiobotocore (httpx backend) under trio, 8 concurrent 8 MiB ranged GETs
- dd: the same bytes from a local file, page cache dropped (the disk ceiling)
- cachefs cold: empty cache, page cache dropped, `dd bs=1M` through the mount
- cachefs warm: chunks on the SSD, remounted and page cache dropped
- cachefs hot: read again on the same mount (kernel page cache)
S3 is s3rver (bench/run.sh installs it). Needs root (drops the page cache).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from bench import MiB, S3Server, boto3_client, drop_page_cache, s3_env, write_random  # noqa: E402

BUCKET = "largeobj"


def direct_download(url: str, key: str, size: int, par: int = 8, rng: int = 8 * MiB) -> float:
    import aiobotocore.httpxsession
    import aiobotocore.session
    import trio
    from aiobotocore.config import AioConfig

    async def main() -> float:
        cfg = AioConfig(http_session_cls=aiobotocore.httpxsession.HttpxSession,
                        max_pool_connections=par)
        async with aiobotocore.session.get_session().create_client(
                "s3", endpoint_url=url, region_name=bench.REGION,
                aws_access_key_id=bench.ACCESS_KEY, aws_secret_access_key=bench.SECRET_KEY,
                config=cfg) as c:
            offsets = list(range(0, size, rng))
            got = 0

            async def worker() -> None:
                nonlocal got
                while offsets:
                    off = offsets.pop()
                    end = min(off + rng, size) - 1
                    r = await c.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={off}-{end}")
                    async with r["Body"] as b:
                        data = await b.read()
                    got += len(data)

            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(par):
                    n.start_soon(worker)
            assert got == size, (got, size)
            return size / (time.perf_counter() - t0) / 1e6

    return trio.run(main)


def dd(path: Path, size: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], check=True,
                   capture_output=True)
    return size / (time.perf_counter() - t0) / 1e6


def cachefs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cachefs", *args], check=True, env=s3_env(),
                   capture_output=True, text=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=bench.BENCH / ".work" / "largeobj")
    args = ap.parse_args()
    from cachefs.config import parse_size

    size = parse_size(args.size, "--size")
    args.work.mkdir(parents=True, exist_ok=True)
    local = args.work / f"obj-{size}.bin"
    if not local.exists() or local.stat().st_size != size:
        write_random(local, size)
    s3 = S3Server(args.work / "s3", BUCKET, args.work / "s3rver.log")
    s3.start()
    tmp = Path(tempfile.mkdtemp(prefix="cachefs-largeobj-"))
    mp, cache = tmp / "mnt", tmp / "cache"
    mp.mkdir()
    res: dict[str, list[float]] = {k: [] for k in ("s3-direct", "dd", "cachefs cold",
                                                   "cachefs warm", "cachefs hot")}
    try:
        boto3_client(s3.url).upload_file(str(local), BUCKET, "obj.bin")
        mount = ["mount", f"s3://{BUCKET}", str(mp), "--endpoint-url", s3.url, "--cache-dir",
                 str(cache), "--cache-size", f"{2 * size + (1 << 30)}"]
        for run in range(args.runs):
            drop_page_cache()
            res["s3-direct"].append(direct_download(s3.url, "obj.bin", size))
            drop_page_cache()
            res["dd"].append(dd(local, size))
            shutil.rmtree(cache, ignore_errors=True)
            cachefs(*mount)
            try:
                drop_page_cache()
                res["cachefs cold"].append(dd(mp / "obj.bin", size))
            finally:
                cachefs("umount", str(mp))
            cachefs(*mount)
            try:
                drop_page_cache()
                res["cachefs warm"].append(dd(mp / "obj.bin", size))
                res["cachefs hot"].append(dd(mp / "obj.bin", size))
            finally:
                cachefs("umount", str(mp))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()),
                  flush=True)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n{size / MiB:.0f} MiB object, median of {args.runs} runs (MB/s; min–max)")
    for k, v in res.items():
        print(f"  {k:<14} {med[k]:>7.0f}   ({min(v):.0f}–{max(v):.0f})")
    print(f"  cachefs cold / s3-direct = {med['cachefs cold'] / med['s3-direct']:.2f}")
    print(f"  cachefs warm / dd        = {med['cachefs warm'] / med['dd']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
