"""Cache control by file list: `cachefs preload / free / status` (issue #3).

Real FUSE mounts (one `cachefs mount --foreground` per test), real moto behind
the counting proxy; chunk size 64 KiB.  Assertions are on GET counts and bytes.
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from cachefs_env import CREDS, cli

from cachefs import filelist
from cachefs.cli_datasets import Progress, _estimate_text
from cachefs.errors import QuietError
from cachefs.filelist import MountInfo
from cachefs.store.chunkstore import file_size
from cachefs.throughput import ThroughputModel

KiB = 1024
CHUNK = 64 * KiB


def payload(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def put(s3, bucket: str, files: dict[str, int]) -> dict[str, bytes]:
    out = {}
    for i, (key, size) in enumerate(files.items()):
        out[key] = payload(size, i)
        s3.put_object(Bucket=bucket, Key=key, Body=out[key])
    return out


def nchunks(sizes) -> int:
    return sum((s + CHUNK - 1) // CHUNK for s in sizes)


def write_list(tmp_path, lines: list[str], name: str = "list.txt") -> str:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def run_json(*args, **kw) -> tuple[dict, subprocess.CompletedProcess]:
    r = cli(*args, "--json", **kw)
    try:
        return json.loads(r.stdout), r
    except ValueError:
        raise AssertionError(f"no JSON from cachefs {args}: {r.returncode} {r.stderr}") from None


def files_by_path(st: dict) -> dict[str, dict]:
    return {os.path.basename(f["path"]): f for f in st["files"]}


DATA = {"data/a.bin": 200 * KiB, "data/b.bin": 128 * KiB, "data/sub/c.bin": 100 * KiB,
        "other/d.bin": 64 * KiB}


# -- file list parsing (no daemon) --------------------------------------------------------


def test_filelist_translate():
    ms = [MountInfo("", "bkt", "train/")]
    text = ("# comment\n\n  /mnt/t/a/b.bin  \nrel/x\ns3://bkt/train/shards/\ns3://bkt/train\n"
            "/elsewhere/f\ns3://other/k\ns3://bkt/test/k\n../up\n/mnt/t\n")
    entries, errors = filelist.parse(text, mountpoint="/mnt/t", mounts=ms, single_root=True)
    assert [(e.line, e.rel) for e in entries] == [(3, "a/b.bin"), (4, "rel/x"), (5, "shards"),
                                                   (6, ""), (11, "")]
    assert [(e.line, e.reason.split(" ")[0]) for e in errors] == [
        (7, "not"), (8, "bucket"), (9, "outside"), (10, "climbs")]
    assert "bucket other is not mounted" in errors[1].reason
    multi = [MountInfo("imgs", "b1", ""), MountInfo("txt", "b2", "corpus/")]
    entries, errors = filelist.parse("s3://b1/x/y\ns3://b2/corpus/z\nimgs/q\n", mountpoint="/m",
                                     mounts=multi, single_root=False)
    assert [e.rel for e in entries] == ["imgs/x/y", "txt/z", "imgs/q"] and not errors
    # one bucket name from two endpoints: an s3:// entry names neither (the first was
    # taken, and a preload, pin or free acted on the wrong copy); a path does
    twice = [MountInfo("dc1", "data", ""), MountInfo("dc2", "data", "")]
    entries, errors = filelist.parse("s3://data/x\ndc2/x\n", mountpoint="/m", mounts=twice,
                                     single_root=False)
    assert [e.rel for e in entries] == ["dc2/x"]
    assert [(e.line, e.reason) for e in errors] == [
        (1, "s3://data/ is mounted more than once (as dc1, dc2, from different endpoints): "
            "name the file by its path under the mount")]
    assert filelist.mount_for(["/m/a", "/m/b/c"], ["/m", "/n"]) == "/m"
    assert filelist.mount_for(["/m/a", "/n/b"], ["/m", "/n"]) is None


def test_progress_lines_off_a_terminal_thin_out_on_a_long_run(monkeypatch, capsys):
    """Off a terminal (a job's log), a line every 2 s: 18,000 lines for a ten-hour preload.
    Every 2 s for the first minute, then ever further apart, at most a minute."""
    from cachefs import cli_datasets

    now = [0.0]
    monkeypatch.setattr(cli_datasets.time, "monotonic", lambda: now[0])
    p = Progress(enabled=True)
    p.tty = False
    for s in range(0, 10 * 3600, 1):  # an event a second for ten hours
        now[0] = 1000.0 + s
        p({"kind": "progress", "elapsed": float(s), "files_done": 0, "files_total": 1,
           "bytes_done": 0, "bytes_total": 1, "fetched_bytes": 0, "missing_bytes": 1})
    lines = capsys.readouterr().err.splitlines()
    # 30 in the first minute, about 100 to half an hour, then one a minute: 18,000 before
    assert 650 < len(lines) < 720, len(lines)


def test_a_measurement_an_hour_old_is_measured_again(monkeypatch):
    """A daemon's model kept what it measured a week ago: a dry run at that concurrency
    measured nothing, and the estimate was of S3 as it was then."""
    from cachefs import throughput

    now = [1000.0]
    monkeypatch.setattr(throughput.time, "monotonic", lambda: now[0])
    m = ThroughputModel()
    for _ in range(5):
        m.observe(CHUNK, 0.1, 8)
    assert m.near(8)
    now[0] += throughput.STALE_AFTER + 1
    assert not m.near(8)  # a dry run measures it again
    m.observe(CHUNK, 0.4, 8)  # S3 is slower now: the old samples go
    assert m.estimate(8 * CHUNK, 8, 8, 32)["seconds"] == pytest.approx(0.4, rel=0.01)


def test_a_wait_for_a_readers_fetch_is_not_learned_as_a_fetch():
    """A preload's worker that joined a reader's fetch under way timed the rest of that
    fetch as one of its own: a short "fetch" the model learned (with 30% of such joins,
    an estimate of 35 s for a run of 50)."""
    from cachefs.throughput import ThroughputModel

    m = ThroughputModel()
    with m.timed(1 << 20, observe=False) as t:
        assert m.inflight == 0  # not a stream either
        time.sleep(0.01)
    assert m.samples == 0 and t.seconds >= 0.01 and not t.observed
    with m.timed(1 << 20):
        assert m.inflight == 1
    assert m.samples == 1 and m.inflight == 0


def test_throughput_model(monkeypatch):
    m = ThroughputModel()
    assert m.estimate(10 * CHUNK, 10, 8, 32)["seconds"] is None  # no measurement yet
    for _ in range(5):  # equal sizes at 1 stream: per byte and per chunk agree
        m.observe(CHUNK, 0.1, 1)
    est = m.estimate(16 * CHUNK, 16, 1, 32)
    assert est["basis"] == "measured" and est["seconds"] == pytest.approx(1.6)
    assert "seconds_low" not in est
    # a server that saturates: 8 streams take 4x as long per chunk, so 2x the aggregate
    for _ in range(5):
        m.observe(CHUNK, 0.4, 8)
    est = m.estimate(80 * CHUNK, 80, 8, 32)
    assert est["basis"] == "measured" and est["seconds"] == pytest.approx(4.0)
    assert m.estimate(80 * CHUNK, 80, 1, 32)["seconds"] == pytest.approx(8.0)
    for _ in range(2):  # the tail of a run, as its streams finish: too few to count
        m.observe(CHUNK, 0.52, 5.3)
    est = m.estimate(80 * CHUNK, 80, 4, 32)  # between the two, on a log-log line
    assert est["basis"] == "interpolated" and est["seconds"] == pytest.approx(8 * 0.5 ** (2 / 3), abs=1e-3)
    assert _estimate_text(est) == (
        "5.0s with 4 streams (interpolated between fetches measured at 1 and 8 streams; from "
        "12 chunk fetches since the daemon started)")
    # more streams than measured: from "no further gain" to "linear gain", never just linear
    est = m.estimate(80 * CHUNK, 80, 32, 64)
    assert est["basis"] == "extrapolated" and est["measured_streams"] == [1, 8]
    assert (est["seconds_low"], est["seconds_high"]) == (pytest.approx(1.0), pytest.approx(4.0))
    assert est["seconds"] == pytest.approx(2.0)
    assert _estimate_text(est) == (
        "1.0s to 4.0s with 32 streams (fetches were measured only at 1 and 8 streams, hence "
        "the range; a dry run with this --parallel would measure fetches at 32 streams; from "
        "12 chunk fetches since the daemon started)")
    assert m.estimate(80 * CHUNK, 80, 32, 8)["streams"] == 8  # capped by the S3 concurrency
    assert m.near(8) and m.near(10) and not m.near(4)
    # chunks of another size than measured: between per-byte and per-chunk time
    est = m.estimate(80 * CHUNK // 8, 80, 1, 32)
    assert (est["seconds_low"], est["seconds_high"]) == (pytest.approx(1.0), pytest.approx(8.0))
    assert _estimate_text(est) == (
        "1.0s to 8.0s with 1 stream (measured at 1 stream; the fetches were timed on 64.0 KiB "
        "chunks and this data set's average 8.0 KiB, hence the range; from 12 chunk fetches "
        "since the daemon started)")
    # concurrencies are time-weighted means: shown as whole streams, "about"
    assert _estimate_text({**est, "basis": "extrapolated", "streams": 8,
                           "measured_streams": [2.4, 4.0]}).startswith(
        "1.0s to 8.0s with 8 streams (fetches were measured only at about 2 and 4 streams, "
        "hence the range; a dry run with this --parallel would measure fetches at 8 streams; ")
    # ... and after a dry run that measured (at most a quarter of the chunks: fewer streams),
    # no advice to run one; a range whose ends look the same is one figure
    assert _estimate_text({**est, "basis": "extrapolated", "streams": 7, "probed_chunks": 4,
                           "seconds_low": 0.1, "seconds_high": 0.12,
                           "measured_streams": [4]}) == (
        "0.1s with 7 streams (fetches were measured only at 4 streams (a dry run fetches at "
        "most a quarter of the missing chunks); from 4 chunk fetches just now)")
    # sizes that vary separate latency from bandwidth: t = 10 ms + bytes / 1 MB/s
    m = ThroughputModel()
    for size in (CHUNK, CHUNK // 4, CHUNK // 2) * 4:
        m.observe(size, 0.01 + size / 1e6, 2)
    est = m.estimate(4_000_000, 40, 2, 32)
    assert est["seconds"] == pytest.approx((40 * 0.01 + 4.0) / 2, rel=1e-3)
    assert "seconds_low" not in est
    assert m.estimate(0, 0, 8, 32)["seconds"] == 0
    # a fetch is timed with the mean number in flight beside it
    from cachefs import throughput

    clock = [1000.0]  # (a fake clock: real sleeps of 20 ms made the mean depend on the host)
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    m = ThroughputModel()
    with m.timed(CHUNK) as a:
        with m.timed(CHUNK) as b:
            clock[0] += 0.02
        clock[0] += 0.02
    with pytest.raises(OSError), m.timed(CHUNK):
        raise OSError("a failed fetch is not a sample")
    assert b.streams == pytest.approx(2.0) and a.streams == pytest.approx(1.5)
    assert m.samples == 2 and m.inflight == 0


# -- preload ------------------------------------------------------------------------------


def test_a_preload_of_a_directory_waits_for_its_relisting(mounts, bucket, s3, proxy,
                                                          tmp_path):
    """A directory whose listing was older than the TTL was relisted in the background
    and walked with the old listing after 1 s: a `preload shards/` after new shards were
    uploaded left them out, with success (and `status` said 100%). It waits for the
    relisting now; one that S3 fails fails the entry."""
    put(s3, bucket, {"shards/a.bin": 1000})
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    lst = write_list(tmp_path, ["shards/"])
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0 and res["files"] == 1, r.stderr
    put(s3, bucket, {"shards/b.bin": 2000})
    time.sleep(1.2)  # past the TTL
    proxy.faults(delay=2, count=-1, ops=["ListObjects"])  # relistings longer than 1 s
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    proxy.clear_faults()
    assert r.returncode == 0, r.stderr
    assert (res["files"], res["total_bytes"], res["fetched_bytes"]) == (2, 3000, 2000), res
    time.sleep(1.2)
    proxy.faults(persistent_status=500, ops=["ListObjects"])
    res, r = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    proxy.clear_faults()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "shards/" in r.stderr


def test_a_file_replaced_since_it_was_listed_is_preloaded_by_the_next_run(
        mounts, bucket, s3, proxy, tmp_path):
    """A file overwritten in S3 after its directory was listed failed the preload ("the
    object changed"), and so did every run after it until the listing expired (5 min by
    default): nothing asked S3 for the new version. The next run does now."""
    put(s3, bucket, {"d/a.bin": 3000})
    m = mounts(f"s3://{bucket}")
    assert os.listdir(m.path("d")) == ["a.bin"]
    new = payload(5000, 9)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=new)
    lst = write_list(tmp_path, ["d/a.bin"])
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 1 and "changed in S3 since it was listed" in r.stderr, r.stderr
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert (res["total_bytes"], res["fetched_bytes"]) == (5000, 5000), res
    assert m.path("d/a.bin").read_bytes() == new


def test_preload_then_read_without_gets(mounts, bucket, s3, proxy, tmp_path):
    data = put(s3, bucket, DATA)
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["# the training set", f"{m.mp}/data", "",
                                f"s3://{bucket}/other/d.bin", "data/a.bin"])  # a.bin twice
    proxy.reset()
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    total_chunks = nchunks(DATA.values())
    assert proxy.gets() == total_chunks
    out = r.stdout
    assert "4 files" in out and "already cached" in out and "fetched" in out
    assert "estimate" in out and "actual" in out and "duration" in out
    # every byte through the mount, zero GETs
    for key, body in data.items():
        assert (m.mp / key).read_bytes() == body
    assert proxy.gets() == total_chunks
    # a second preload fetches nothing
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert proxy.gets() == total_chunks
    assert res["files"] == 4 and res["total_bytes"] == sum(DATA.values())
    assert res["cached_before_bytes"] == res["total_bytes"]
    assert res["fetched_bytes"] == 0 and res["failed"] == [] and res["seconds"] >= 0


def test_the_progress_bar_fits_a_narrow_terminal(mounts, bucket, s3, proxy, tmp_path):
    """The bar's line was drawn whatever the terminal's width: on 80 columns (a long list's
    line is 100 or more) each redraw left a row behind and the screen scrolled."""
    import fcntl
    import pty
    import struct
    import termios

    put(s3, bucket, {f"bar/{i}.bin": CHUNK for i in range(6)})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["bar/"])
    proxy.faults(delay=0.3, count=-1)  # a second or two of progress
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list", lst,
                          "--mount", str(m.mp), "--parallel", "1"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=slave, env={**os.environ, **CREDS})
    os.close(slave)
    err = b""
    while True:
        try:
            got = os.read(master, 65536)
        except OSError:  # (EIO: the command closed the terminal)
            break
        if not got:
            break
        err += got
    p.communicate(timeout=60)
    os.close(master)
    proxy.clear_faults()
    assert p.returncode == 0, err
    drawn = [seg for seg in err.decode().replace("\x1b[K", "").split("\r")
             if seg.startswith("[")]  # (the bar's lines)
    assert drawn and all(len(seg.rstrip("\n")) < 50 for seg in drawn), drawn


def test_an_object_two_mounts_show_counts_once(bucket, s3, proxy, mounts, tmp_path):
    """Two [[mount]] tables that overlap (a bucket, and a prefix of it): a list naming a
    file through both counted it twice, its bytes, fetch and estimate too."""
    put(s3, bucket, {"train/x.bin": CHUNK, "train/y.bin": CHUNK})
    cfg = tmp_path / "cachefs.toml"
    cfg.write_text(f'[s3]\nendpoint_url = "{proxy.url}"\n'
                   f'[[mount]]\nname = "all"\nsource = "s3://{bucket}"\n'
                   f'[[mount]]\nname = "train"\nsource = "s3://{bucket}/train"\n')
    m = mounts("", config=str(cfg), endpoint="")
    lst = write_list(tmp_path, ["all/train/", "train/x.bin", f"{m.mp}/train/y.bin"])
    proxy.reset()
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert (res["files"], res["total_bytes"], proxy.gets()) == (2, 2 * CHUNK, 2), res


def test_the_eta_counts_the_round_trips_of_small_files_left(mounts, bucket, s3, proxy,
                                                            tmp_path):
    """A large file, then many small ones: with 99% of the bytes in, the ETA was the bytes
    left at the bytes' rate, "ETA 0.0s", while every small file left was a round trip to
    S3 still to make. It is now the daemon's, from the chunks and bytes left."""
    put(s3, bucket, {"eta/0-big.bin": 20 * CHUNK,
                     **{f"eta/{i:03}.bin": 100 for i in range(1, 91)}})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["eta/"])
    proxy.faults(delay=0.05, count=-1)  # each GET a round trip of 50 ms at least
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp), "--parallel", "1")
    proxy.clear_faults()
    assert_eta_counts_the_small_files_left(r)


def test_chunks_readers_cache_during_a_preload_are_not_left_to_fetch(mounts, bucket, s3,
                                                                    proxy, tmp_path):
    """Files a reader caches while a preload works on earlier ones: the ETA counted them
    as left to fetch to the end of the run, and `--pin` read them back from the SSD as
    fetches (its throughput model learning SSD speed). They are now "found cached":
    pinned in place, and not left."""
    import re

    put(s3, bucket, {f"mw/{n}.bin": CHUNK for n in ("0-slow", "1", "2", "3-slow")})
    put(s3, bucket, {f"pin/{n}.bin": CHUNK for n in ("0-slow", "1", "2")})
    m = mounts(f"s3://{bucket}")
    proxy.reset()
    proxy.faults(delay=3.0, count=-1, key_filter="slow")
    env = {**os.environ, **CREDS}
    for part, pin in (("mw", False), ("pin", True)):
        lst = write_list(tmp_path, [f"{part}/"], name=f"{part}.txt")
        p = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list", lst,
                              "--mount", str(m.mp), "--parallel", "1", *(["--pin"] * pin)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not proxy.gets(f"{part}/0-slow.bin", settle=0) and time.monotonic() < deadline:
            time.sleep(0.05)
        for n in ("1", "2"):  # read while the preload waits on 0-slow
            (m.mp / part / f"{n}.bin").read_bytes()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert re.search(r"fetched +128\.0 KiB \(2 chunks\)" if not pin
                         else r"fetched +64\.0 KiB \(1 chunk\)", out), out
        assert re.search(r"found cached +128\.0 KiB \(2 chunks", out), out
        if not pin:
            # while 3-slow is fetched, one chunk is left: the ETA is one fetch's time
            # (it was three: 1 and 2 were still counted)
            etas = [float(e) for f, e in re.findall(r"(\d)/4 files, .*?ETA ([\d.]+)s", err)
                    if f == "3"]
            assert etas and max(etas) < 5.0, err
    proxy.clear_faults()
    assert proxy.gets() == 7  # each chunk once: nothing read twice
    st, _ = run_json("status", "--file-list", write_list(tmp_path, ["pin/"]), "--mount",
                     str(m.mp))
    assert st["pinned_bytes"] == 3 * CHUNK, st


def assert_eta_counts_the_small_files_left(r) -> None:
    """A preload of a large file, then 90 small ones: its progress lines with 99% of the
    bytes in and 20 or more small files left show an ETA above 0."""
    import re

    assert r.returncode == 0, r.stderr
    lines = [(int(f), float(b), e) for f, b, e in re.findall(
        r"(\d+)/91 files, .*?\((\d+)%\), .*?ETA (\S+)", r.stderr)]
    late = [(f, e) for f, b, e in lines if b >= 99 and f <= 70]  # 20+ small files left
    assert late and all(e not in ("0s", "0.0s") for _, e in late), r.stderr


def test_dry_run_estimate(mounts, bucket, s3, proxy, tmp_path):
    put(s3, bucket, DATA)
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["data", "other"])
    total, chunks = sum(DATA.values()), nchunks(DATA.values())
    proxy.reset()
    proxy.faults(delay=1.0, count=-1)  # every GET takes a second: an S3 of known speed
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run",
                      "--parallel", "2")
    assert r.returncode == 0, r.stderr
    # nothing measured at 2 streams: the list's chunks were fetched 2 at a time for about
    # 2 s, timed, and kept; the plan is what was missing before
    est = res["estimate"]
    probed = est["probed_chunks"]
    assert 2 <= probed <= 6 and proxy.gets() == probed, (est, proxy.gets())
    assert res["dry_run"] is True and res["missing_bytes"] == total
    assert est["basis"] == "measured" and est["streams"] == 2
    assert chunks / 2 * 0.9 < est["seconds"] < chunks / 2 * 1.5, est  # ~1 s per chunk
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run", "--parallel", "2")
    assert r.returncode == 0 and "to fetch" in r.stdout, r.stderr
    assert "with 2 streams (measured at 2 streams; from" in r.stdout, r.stdout
    assert proxy.gets() == probed  # measured already: no new fetch
    proxy.clear_faults()
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--parallel", "2")
    assert res["cached_before_bytes"] > 0 and res["fetched_bytes"] < total
    assert res["cached_before_bytes"] + res["fetched_bytes"] == total
    assert res["estimate"]["basis"] == "measured" and res["estimate"]["seconds"] > 0
    assert proxy.gets() == chunks
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run")
    assert res["missing_bytes"] == 0 and res["estimate"]["seconds"] == 0
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run")
    assert r.returncode == 0 and "nothing to fetch" in r.stdout, r.stderr


def test_dry_run_of_a_small_list_fetches_at_most_a_quarter(mounts, bucket, s3, proxy, tmp_path):
    sizes = {f"many/f{i:02d}.bin": 4 * CHUNK for i in range(10)}  # 40 chunks, fetched fast
    put(s3, bucket, sizes)
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["many/"])
    proxy.reset()
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run",
                      "--parallel", "8")
    assert r.returncode == 0, r.stderr
    # 2 s at 8 streams would fetch all 40; the probe stops at a quarter of what is missing
    assert res["missing_chunks"] == 40
    assert 4 <= res["estimate"]["probed_chunks"] == proxy.gets() <= 10, (res, proxy.gets())
    assert res["estimate"]["basis"] in ("measured", "interpolated", "extrapolated")
    # what it fetched to measure is said (it stays cached: the preload has that much less)
    assert res["fetched_chunks"] == proxy.gets() and res["fetched_bytes"] == proxy.gets() * CHUNK
    st, _ = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    assert st["cached_bytes"] == res["fetched_bytes"]


def test_interrupted_preload_resumes(mounts, bucket, s3, proxy, tmp_path):
    sizes = {f"shards/s{i}.bin": 4 * CHUNK for i in range(4)}
    data = put(s3, bucket, sizes)
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["shards/"])
    total_chunks = nchunks(sizes.values())
    proxy.reset()
    proxy.faults(delay=0.5, count=-1)  # the preload outlasts the interrupt on a busy machine
    env = {**os.environ, **CREDS}
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list", lst,
                          "--mount", str(m.mp), "--parallel", "2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while proxy.gets(settle=0) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    # reads are not disturbed: the last shard reads correctly while fetches drain
    assert (m.mp / "shards/s3.bin").read_bytes() == data["shards/s3.bin"]
    deadline = time.monotonic() + 20
    while m.stats()["in_flight_fetches"] and time.monotonic() < deadline:
        time.sleep(0.05)
    first = proxy.gets()
    assert first < total_chunks
    proxy.clear_faults()
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--parallel", "2")
    assert r.returncode == 0, r.stderr
    assert res["fetched_bytes"] == (total_chunks - first) * CHUNK
    assert proxy.gets() == total_chunks  # each chunk fetched exactly once, overall


def test_free_right_after_an_interrupted_pinning_preload_leaves_nothing_pinned(
        mounts, bucket, s3, proxy, tmp_path):
    """Ctrl-C on `preload --pin`, then `free` of the same list: the fetches the preload had
    under way went on in the daemon and cached their chunks pinned after the free was
    over, so pinned data the user had just freed stayed, never evicted. The free now
    makes them cache unpinned and drops what lands within a few seconds."""
    sizes = {f"shards/s{i}.bin": 4 * CHUNK for i in range(4)}
    put(s3, bucket, sizes)
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["shards/"])
    proxy.reset()
    # the fetches under way outlast the interrupt and the two statuses below, and land
    # within the free's wait for them (FREE_WAIT, 4 s, from its start after theirs)
    proxy.faults(delay=4.0, count=-1)
    env = {**os.environ, **CREDS}
    p = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list", lst,
                          "--mount", str(m.mp), "--parallel", "2", "--pin"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while m.stats()["in_flight_fetches"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    t_seen = time.monotonic()  # (the fetches started before, and land 4 s after their start)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert m.stats()["in_flight_fetches"] > 0  # still fetching, pinned
    # status said the data set pinned all 4 files, its claims taken for pins
    st, _ = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    (claims,) = st["pinned_by"].values()
    assert claims["files"] == 4 and claims["unpinned"] >= 3, st["pinned_by"]
    r = cli("status", "--file-list", lst, "--mount", str(m.mp))
    assert "(4 files; " in r.stdout and " not pinned yet)" in r.stdout, r.stdout
    # the free waits for those fetches; its client must hear from the daemon meanwhile (it
    # gives up after a silence, and a free of a million chunks is silent for minutes)
    assert m.stats()["in_flight_fetches"] > 0  # (or the free below waits for nothing)
    lines = [time.monotonic()]
    res = m.request({"op": "free", "entries": [[1, "shards", "shards/"]],
                     "holder": os.path.realpath(lst)},
                    on_event=lambda ev: lines.append(time.monotonic()), timeout=30)
    lines.append(time.monotonic())
    assert lines[-1] - t_seen > 3.5  # it did wait for the fetches
    assert max(b - a for a, b in zip(lines, lines[1:], strict=False)) < 2.5, lines
    deadline = time.monotonic() + 20
    while m.stats()["in_flight_fetches"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m.stats()["cache"]["pinned_bytes"] == 0
    st, _ = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    assert st["pinned_bytes"] == 0 and st["cached_bytes"] == 0
    assert res["freed_chunks"] >= 2  # the fetches under way, dropped once they landed


def test_counts_of_one_are_singular(mounts, bucket, s3, proxy, tmp_path):
    """One file of one chunk: preload, stats, free, dry run and status say '1 file',
    '1 chunk' (they said '1 files', '1 chunks')."""
    put(s3, bucket, {"one.bin": CHUNK})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["one.bin"])
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert "preload: 1 file, 64.0 KiB; 0 B already cached" in r.stderr, r.stderr
    assert f"preload into {m.mp}: 1 file, 64.0 KiB listed" in r.stdout, r.stdout
    assert "  fetched         64.0 KiB (1 chunk) in " in r.stdout, r.stdout
    r = cli("stats", "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    cache = r.stdout.splitlines()[1]
    assert cache.startswith("  cache ") and cache.endswith(", 1 chunk"), r.stdout
    r = cli("status", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0 and "total: 1 file, 64.0 KiB;" in r.stdout, r.stdout
    r = cli("free", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("freed 64.0 KiB (1 chunk, 0 pinned) of 1 file listed"), r.stdout
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"dry run for {m.mp}: 1 file, 64.0 KiB listed" in r.stdout, r.stdout
    assert "  to fetch        64.0 KiB (1 chunk)" in r.stdout, r.stdout
    assert "(measured at 1 stream; from 1 chunk fetch since the daemon started)" in r.stdout


def test_failed_bytes_are_not_progress(mounts, bucket, s3, proxy, tmp_path):
    """While S3 fails a file, its chunks are not progress ('64 KiB of 293 KiB (22%)' was
    shown for a file that had failed), the file is not done, and the summary says how
    many files and bytes failed."""
    put(s3, bucket, {"bad.bin": 293 * KiB, "good.bin": 3 * CHUNK})
    m = mounts(f"s3://{bucket}", extra=("--s3-max-attempts", "2"))
    proxy.reset()
    # bad.bin fails at once; good.bin takes 2 s, so progress is reported after the failure
    proxy.faults([{"persistent_status": 500, "key_filter": "bad.bin"},
                  {"delay": 2.0, "count": -1, "key_filter": "good.bin"}])
    events: list[dict] = []
    try:
        res = m.request({"op": "preload", "parallel": 8,
                         "entries": [[1, "bad.bin", "bad.bin"], [2, "good.bin", "good.bin"]]},
                        on_event=events.append, timeout=60)
    finally:
        proxy.clear_faults()
    prog = [e for e in events if e.get("kind") == "progress"]
    for e in prog:  # nothing was cached before: only what was fetched is done
        assert e["bytes_done"] == e["fetched_bytes"], prog
    failed = [e for e in prog if e["failed_files"]]
    assert failed, events
    ev = failed[0]
    assert ev["failed_bytes"] == 293 * KiB and ev["files_done"] == 0 and ev["bytes_done"] == 0
    line = Progress(enabled=True)._line(ev)
    assert line.startswith("0/2 files, 0 B of 485.0 KiB (0%), "), line
    assert line.endswith(", 1 file (293.0 KiB) failed"), line
    assert res["failed_files"] == 1 and res["failed_bytes"] == 293 * KiB
    assert res["fetched_bytes"] == 3 * CHUNK and [f["line"] for f in res["failed"]] == [1]
    # the summary, with S3 still failing bad.bin: good.bin is cached, bad.bin fails again
    lst = write_list(tmp_path, ["bad.bin", "good.bin"])
    proxy.faults(persistent_status=500, key_filter="bad.bin")
    try:
        r = cli("preload", "--file-list", lst, "--mount", str(m.mp))
    finally:
        proxy.clear_faults()
    assert r.returncode == 1 and f"{lst}:1: bad.bin: " in r.stderr, r.stderr
    assert "  failed          1 entry (listed on stderr); 1 file (293.0 KiB) not fetched\n" \
        in r.stdout, r.stdout


# -- free / status ------------------------------------------------------------------------


def test_free_removes_exactly_the_listed_files(mounts, bucket, s3, proxy, tmp_path):
    put(s3, bucket, DATA)
    m = mounts(f"s3://{bucket}")
    everything = write_list(tmp_path, ["data", "other"], "all.txt")
    some = write_list(tmp_path, ["data/a.bin", f"s3://{bucket}/data/sub/"], "some.txt")
    assert cli("preload", "--file-list", everything, "--mount", str(m.mp)).returncode == 0
    before, r = run_json("status", "--file-list", everything, "--mount", str(m.mp))
    assert before["total_bytes"] == before["cached_bytes"] == sum(DATA.values())
    assert before["pinned_bytes"] == 0 and len(before["files"]) == 4
    res, r = run_json("free", "--file-list", some, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert res["freed_bytes"] == 300 * KiB and res["files"] == 2
    after, _ = run_json("status", "--file-list", everything, "--mount", str(m.mp))
    f = files_by_path(after)
    assert f["a.bin"]["cached_bytes"] == 0 and f["c.bin"]["cached_bytes"] == 0
    assert f["b.bin"]["cached_bytes"] == 128 * KiB and f["d.bin"]["cached_bytes"] == 64 * KiB
    assert after["cached_bytes"] == sum(DATA.values()) - 300 * KiB
    assert f["a.bin"]["path"] == f"{m.mp}/data/a.bin"
    r = cli("status", "--file-list", everything, "--mount", str(m.mp))
    assert r.returncode == 0
    assert "total: 4 files" in r.stdout and "(39.0%)" in r.stdout  # 192 of 492 KiB
    assert f"{m.mp}/data/b.bin" in r.stdout
    # a freed file reads back correctly (refetched)
    proxy.reset()
    assert (m.mp / "data/a.bin").read_bytes() == payload(200 * KiB, 0)
    assert proxy.gets() == 4


def test_status_of_an_empty_file(mounts, bucket, s3, tmp_path):
    """A 0-byte file never pinned showed as 100.0% cached and 100.0% pinned, and a total
    of 0 B as "pinned 0 B (100.0%)": a share of nothing is shown as "—"."""
    put(s3, bucket, {"e/empty": 0, "e/full.bin": 2 * CHUNK})
    m = mounts(f"s3://{bucket}")
    empty = write_list(tmp_path, ["e/empty"], "empty.txt")
    both = write_list(tmp_path, ["e/"], "both.txt")
    r = cli("status", "--file-list", empty, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        " cached  pinned       size  path",
        f"      —       —        0 B  {m.mp}/e/empty",
        "total: 1 file, 0 B; cached 0 B (—), pinned 0 B (—)"]
    st, _ = run_json("status", "--file-list", empty, "--mount", str(m.mp))
    assert st["files"][0]["size"] == st["files"][0]["pinned_bytes"] == st["pinned_bytes"] == 0
    assert cli("preload", "--file-list", both, "--mount", str(m.mp), "--pin").returncode == 0
    r = cli("status", "--file-list", both, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [
        f"      —       —        0 B  {m.mp}/e/empty",
        f" 100.0%  100.0%  128.0 KiB  {m.mp}/e/full.bin",
        "total: 2 files, 128.0 KiB; cached 128.0 KiB (100.0%), pinned 128.0 KiB (100.0%)",
        f"pinned by: {os.path.realpath(both)} (1 file)"]  # (an empty file has nothing to pin)


def test_the_status_table_of_a_long_list_is_sent_no_more_rows_than_it_shows(
        mounts, bucket, s3, tmp_path):
    """The plain table shows 30 files; the daemon sent a row for every file (a million
    rows: 150 MB of JSON, parsed whole by the CLI). It now sends the rows asked for, and
    the totals of all."""
    put(s3, bucket, {f"t/f{i:02d}": 10 for i in range(35)})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["t/"])
    r = cli("status", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 1 + 30 + 2 and out[30].endswith(f"{m.mp}/t/f29"), r.stdout
    assert out[-2:] == ["  ... 5 more files (--json lists them all)",
                        "total: 35 files, 350 B; cached 0 B (0.0%), pinned 0 B (0.0%)"]
    st, _ = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    assert len(st["files"]) == st["file_count"] == 35
    res = m.request({"op": "status", "rows": 3, "entries": [[1, "t", "t/"]]})
    assert [f["path"] for f in res["files"]] == ["/t/f00", "/t/f01", "/t/f02"]
    assert res["file_count"] == 35 and res["total_bytes"] == 350
    with pytest.raises(QuietError, match="rows must be a whole number"):
        m.request({"op": "status", "rows": "all", "entries": [[1, "t", "t/"]]})


def test_free_while_reading(mounts, bucket, s3, proxy, tmp_path):
    data = put(s3, bucket, {"big.bin": 16 * CHUNK})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["big.bin"])
    assert cli("preload", "--file-list", lst, "--mount", str(m.mp)).returncode == 0
    with open(m.mp / "big.bin", "rb") as f:
        head = f.read(5 * CHUNK)
        assert cli("free", "--file-list", lst, "--mount", str(m.mp)).returncode == 0
        rest = f.read()
    assert head + rest == data["big.bin"]


# -- pins ---------------------------------------------------------------------------------


def test_the_plan_counts_small_files_as_the_cache_limit_does(mounts, bucket, s3, tmp_path):
    """The cache limit counts what chunk files take on disk (whole 4 KiB blocks): 300
    files of 1,000 bytes are 300 KB of data but 1.2 MB of a 1 MiB cache. The plan said
    they fit, and eviction then dropped most of them during the preload; it now warns,
    and refuses to pin them, in the limit's own unit."""
    put(s3, bucket, {f"tiny/{i:03d}": 1000 for i in range(300)})
    m = mounts(f"s3://{bucket}", cache_size="1MiB")
    lst = write_list(tmp_path, ["tiny"])
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert res["total_bytes"] == 300_000 and res["to_pin_bytes"] == 0
    assert any("larger than the cache room" in w for w in res["warnings"]), res["warnings"]
    r = cli("preload", "--file-list", lst, "--mount", str(m.mp), "--pin")
    assert r.returncode != 0
    assert "cannot pin: 0 B already pinned + 1.2 MiB to pin (on disk)" in r.stderr, r.stderr
    assert m.stats()["cache"]["pinned_bytes"] == 0


def test_chunks_arriving_together_into_a_small_room_are_kept(mounts, bucket, s3, proxy,
                                                              tmp_path):
    """With room for one unpinned chunk and 8 fetches arriving at once, the write in
    flight filled the room while the LRU was still empty, and the others were refused as
    "fetched, but not kept: the cache is full of pinned data" (exit 1): a write now waits
    for those in flight, which are evictable once written."""
    put(s3, bucket, {"p.bin": 4 * CHUNK, **{f"u/{i}.bin": CHUNK for i in range(8)}})
    m = mounts(f"s3://{bucket}", cache_size="360KiB")
    pinned = write_list(tmp_path, ["p.bin"], "pin.txt")
    assert cli("preload", "--file-list", pinned, "--mount", str(m.mp), "--pin").returncode == 0
    proxy.reset()
    proxy.faults(delay=0.5, count=-1)  # the 8 GETs end together
    try:
        res, r = run_json("preload", "--file-list", write_list(tmp_path, ["u/"], "u.txt"),
                          "--mount", str(m.mp), "--parallel", "8")
    finally:
        proxy.clear_faults()
    assert r.returncode == 0 and res["failed_files"] == 0, r.stderr
    assert res["uncached_bytes"] == 0 and res["fetched_chunks"] == 8
    assert m.counters().get("cache_full_uncached", 0) == 0
    assert m.stats()["cache"]["pinned_bytes"] == 4 * file_size(CHUNK)


def test_pins_survive_eviction(mounts, bucket, s3, proxy, tmp_path):
    files = {"p.bin": 4 * CHUNK, "u1.bin": 3 * CHUNK, "u2.bin": 3 * CHUNK, "u3.bin": 3 * CHUNK}
    put(s3, bucket, files)
    m = mounts(f"s3://{bucket}", cache_size="640KiB")
    pinned = write_list(tmp_path, ["p.bin"], "pin.txt")
    unpinned = write_list(tmp_path, ["u1.bin", "u2.bin", "u3.bin"], "unpinned.txt")
    res, r = run_json("preload", "--file-list", pinned, "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    assert res["cache"]["pinned_bytes"] == 4 * file_size(CHUNK)  # the cache counts disk
    r = cli("preload", "--file-list", unpinned, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert "larger than the cache room" in r.stderr and "end of the list" in r.stderr
    # and more pressure from plain reads
    for k in ("u1.bin", "u2.bin"):
        (m.mp / k).read_bytes()
    assert m.counters().get("evictions", 0) > 0
    st, _ = run_json("status", "--file-list", pinned, "--mount", str(m.mp))
    assert st["cached_bytes"] == st["pinned_bytes"] == 4 * CHUNK
    st, _ = run_json("status", "--file-list", unpinned, "--mount", str(m.mp))
    assert st["pinned_bytes"] == 0 and st["cached_bytes"] < 9 * CHUNK
    assert m.stats()["cache"]["used_bytes"] <= 640 * KiB
    # pinning the rest would exceed the limit: refused before fetching anything
    proxy.reset()
    both = write_list(tmp_path, ["p.bin", "u1.bin", "u2.bin", "u3.bin"], "both.txt")
    r = cli("preload", "--file-list", both, "--mount", str(m.mp), "--pin")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot pin" in lines[0] and "cache limit" in lines[0], r.stderr
    assert proxy.gets() == 0
    # free removes the pins with the chunks
    res, r = run_json("free", "--file-list", pinned, "--mount", str(m.mp))
    assert res["pins_removed"] == 4 and res["cache"]["pinned_bytes"] == 0


def test_chunks_fetched_but_not_kept_are_not_progress(mounts, bucket, s3, proxy, tmp_path):
    """A cache full of pinned data: a preload fetched every chunk of the next file and could
    keep none, yet its progress reached 100%, the file counted as done and the exit status
    was 0. That file failed: its chunks are not in the cache."""
    put(s3, bucket, {"p.bin": 9 * CHUNK, "u.bin": 2 * CHUNK})
    m = mounts(f"s3://{bucket}", cache_size="640KiB")
    res, r = run_json("preload", "--file-list", write_list(tmp_path, ["p.bin"], "p.txt"),
                      "--mount", str(m.mp), "--pin")
    assert r.returncode == 0 and res["cache"]["pinned_bytes"] == 9 * file_size(CHUNK), r.stderr
    res, r = run_json("preload", "--file-list", write_list(tmp_path, ["u.bin"], "u.txt"),
                      "--mount", str(m.mp))
    assert res["uncached_bytes"] == 2 * CHUNK and res["failed_files"] == 1, res
    assert res["failed"][0]["reason"].startswith("fetched, but not kept: the cache is full")
    assert res["failed_bytes"] == 2 * CHUNK and res["fetched_files"] == 0, res  # not progress
    assert r.returncode == 1 and "u.txt:1: u.bin: fetched, but not kept" in r.stderr, r.stderr
    assert any("could not be kept in the cache" in w for w in res["warnings"])


def test_a_remount_with_less_room_than_its_pins_says_so(mounts, bucket, s3, tmp_path):
    """Remounted with a --cache-size below what its pinned chunks take, a daemon started
    without a word, and cached nothing new (`cache_full_uncached` counted each chunk)."""
    put(s3, bucket, {"p.bin": 9 * CHUNK})
    m = mounts(f"s3://{bucket}", cache_size="1MiB")
    res, r = run_json("preload", "--file-list", write_list(tmp_path, ["p.bin"], "p.txt"),
                      "--mount", str(m.mp), "--pin")
    assert r.returncode == 0 and res["cache"]["pinned_bytes"] == 9 * file_size(CHUNK), r.stderr
    assert m.stop() == 0
    m.cache_size = "512KiB"
    m.start()
    assert "pinned chunks take 612.0 KiB, all of --cache-size 512.0 KiB: new data is not " \
        "cached until `cachefs free` unpins data sets" in m.log_text(), m.log_text()
    assert m.stop() == 0
    m.cache_size = "640KiB"  # high watermark 90%: 576 KiB
    m.start()
    assert "pinned chunks take 612.0 KiB, above the high watermark (576.0 KiB) of " \
        "--cache-size 640.0 KiB" in m.log_text(), m.log_text()


def test_a_pinned_data_set_preloaded_again_is_not_said_to_be_evicted(mounts, bucket, s3,
                                                                     tmp_path):
    """A preload without --pin of a data set already pinned counted its pinned chunks twice,
    in the data set and in the pinned data outside the room, and warned that LRU eviction
    would drop its files."""
    put(s3, bucket, {"p.bin": 6 * CHUNK})
    m = mounts(f"s3://{bucket}", cache_size="640KiB")
    lst = write_list(tmp_path, ["p.bin"])
    assert cli("preload", "--file-list", lst, "--mount", str(m.mp), "--pin").returncode == 0
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0 and res["warnings"] == [], res["warnings"]


def test_workers_beyond_the_s3_concurrency_teach_the_estimate_nothing_wrong(
        mounts, bucket, s3, proxy, tmp_path):
    """--parallel above [s3] max_concurrency: the extra workers queued for S3 inside their
    timed fetch, so the model learned what 8 streams do, while every estimate asks about
    the 2 that S3 allows: the next preload's estimate stayed an extrapolation."""
    put(s3, bucket, {f"a/{i}.bin": 2 * CHUNK for i in range(6)} |
        {f"b/{i}.bin": 2 * CHUNK for i in range(6)})
    cfg = tmp_path / "c.toml"
    cfg.write_text("[s3]\nmax_concurrency = 2\n")
    m = mounts(f"s3://{bucket}", config=str(cfg))
    proxy.faults(delay=0.2, count=-1)
    try:
        for d in ("a", "b"):
            res, r = run_json("preload", "--file-list", write_list(tmp_path, [d], f"{d}.txt"),
                              "--mount", str(m.mp), "--parallel", "8")
            assert r.returncode == 0, r.stderr
    finally:
        proxy.clear_faults()
    est = res["estimate"]  # the plan of b, from what the preload of a measured
    assert est["streams"] == 2 and est["basis"] == "measured", est


def test_a_data_set_uploaded_moments_ago_is_found(mounts, bucket, s3, proxy, tmp_path):
    """Files uploaded after their directory was listed were "no such file or directory"
    to preload, free and status for the metadata TTL (5 minutes by default): the usual
    order of things is to write a data set, then preload it. A name the listing lacks now
    gets one new listing of its directory per command."""
    put(s3, bucket, {"d/old.bin": CHUNK})
    m = mounts(f"s3://{bucket}")
    assert sorted(os.listdir(m.mp)) == ["d"] and os.listdir(m.path("d")) == ["old.bin"]
    data = put(s3, bucket, {"d/new.bin": 2 * CHUNK, "e/x.bin": CHUNK})
    proxy.reset()
    lst = write_list(tmp_path, ["d/new.bin", "e/x.bin", "d/typo1.bin", "d/typo2.bin"])
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 2, r.stderr  # the typos stay typos
    assert res["files"] == 2 and res["fetched_bytes"] == 3 * CHUNK, res
    assert "protocol" not in res  # the control protocol is no part of the output
    assert [f["entry"] for f in res["failed"]] == ["d/typo1.bin", "d/typo2.bin"]
    # the root and d/ listed once more each, not once per name they lack; e/ for the
    # first time
    assert proxy.stats()["ops"]["ListObjects"] == 3, proxy.stats()["ops"]
    assert m.path("d/new.bin").read_bytes() == data["d/new.bin"]


def test_free_reaches_the_pins_of_versions_s3_replaced(mounts, bucket, s3, proxy, tmp_path):
    """A pinned file overwritten in S3 and pinned again: free found only the chunks of the
    version S3 lists now, and the old version's stayed pinned for good (each update of a
    pinned data set took more of the cache, until pinning was refused)."""
    put(s3, bucket, {"p.bin": 3 * CHUNK})
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    lst = write_list(tmp_path, ["p.bin"])
    assert cli("preload", "--file-list", lst, "--mount", str(m.mp), "--pin").returncode == 0
    s3.put_object(Bucket=bucket, Key="p.bin", Body=b"v2" * CHUNK)  # 2 chunks
    time.sleep(1.2)  # past the metadata TTL
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    assert res["cache"]["pinned_bytes"] == 5 * file_size(CHUNK)  # both versions
    r = cli("free", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert "freed 320.0 KiB (5 chunks, 5 pinned) of 1 file listed (128.0 KiB)" in r.stdout, \
        r.stdout
    assert "with 1 older version of listed files, pinned before S3 replaced them" in r.stdout
    st = m.stats()["cache"]
    assert st["pinned_bytes"] == 0 and st["used_bytes"] == 0, st
    # the record went with them: a second free finds nothing more
    res, r = run_json("free", "--file-list", lst, "--mount", str(m.mp))
    assert res["freed_chunks"] == 0 and res["superseded_versions"] == 0
    # a pinned file deleted from S3: its entry frees what was pinned under the name, and is
    # no "no such file" error; one never pinned still is
    gone = write_list(tmp_path, ["p.bin", "never.bin"], "gone.txt")
    assert cli("preload", "--file-list", lst, "--mount", str(m.mp), "--pin").returncode == 0
    s3.delete_object(Bucket=bucket, Key="p.bin")
    time.sleep(1.2)
    # (another list: it frees for the data set that pinned, by its name)
    res, r = run_json("free", "--file-list", gone, "--mount", str(m.mp),
                      "--name", os.path.realpath(lst))
    assert res["freed_chunks"] == res["pins_removed"] == 2, res
    assert res["superseded_versions"] == 1 and [f["line"] for f in res["failed"]] == [2], res
    assert m.stats()["cache"]["pinned_bytes"] == 0
    # a whole pinned directory deleted from S3 (its parent with it): the directory's entry
    # reaches every name pinned under it
    put(s3, bucket, {"d/x.bin": CHUNK, "d/sub/y.bin": 2 * CHUNK, "e/z.bin": CHUNK})
    time.sleep(1.2)
    both = write_list(tmp_path, ["d", "e/z.bin"], "d.txt")
    assert cli("preload", "--file-list", both, "--mount", str(m.mp), "--pin").returncode == 0
    for k in ("d/x.bin", "d/sub/y.bin"):
        s3.delete_object(Bucket=bucket, Key=k)
    time.sleep(1.2)
    res, r = run_json("free", "--file-list", write_list(tmp_path, ["d/"], "d2.txt"),
                      "--mount", str(m.mp), "--name", os.path.realpath(both))
    assert r.returncode == 0 and res["failed"] == [], (r.stderr, res)
    assert res["freed_chunks"] == res["pins_removed"] == 3 and res["superseded_versions"] == 2
    assert m.stats()["cache"]["pinned_bytes"] == file_size(CHUNK)  # e/z.bin's


def test_a_store_without_etags_frees_no_older_versions_it_never_had(mounts, bucket, s3, proxy,
                                                                    tmp_path):
    """Behind a store that gives no ETags, every free said "with N older versions of listed
    files, pinned before S3 replaced them", one per file freed, pinned or not: the chunks
    such a store's files may have under no version (cached by an older cachefs) were
    counted as older versions."""
    proxy.reset()
    proxy.faults(etag_form="none", ops=["ListObjects", "GetObject", "HeadObject"])
    put(s3, bucket, {"a.bin": 3 * CHUNK, "b.bin": CHUNK})
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["a.bin", "b.bin"])
    for pin in ((), ("--pin",)):
        assert cli("preload", "--file-list", lst, "--mount", str(m.mp), *pin).returncode == 0
        res, r = run_json("free", "--file-list", lst, "--mount", str(m.mp))
        assert r.returncode == 0, r.stderr
        assert res["freed_chunks"] == 4 and res["superseded_versions"] == 0, res
        assert m.stats()["cache"]["used_bytes"] == 0
    assert cli("preload", "--file-list", lst, "--mount", str(m.mp)).returncode == 0
    r = cli("free", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 0 and "freed 256.0 KiB (4 chunks, 0 pinned)" in r.stdout, r.stdout
    assert "older version" not in r.stdout, r.stdout
    assert proxy.stats(settle=0)["faults_by_kind"]["etag_form"] >= 3


def test_free_of_one_data_set_keeps_the_files_another_still_pins(mounts, bucket, s3, proxy,
                                                                 tmp_path):
    """Two pinned data sets that share a file: `free` of one dropped the shared file too
    (pins had no owner), so the other's training job went back to S3 for it. A pin now
    belongs to the data set (the list file's real path, or --name) that made it, and a
    free drops only what no other data set pins, and says what it kept."""
    data = put(s3, bucket, {"s/x.bin": 2 * CHUNK, "a/y.bin": CHUNK, "b/z.bin": CHUNK})
    m = mounts(f"s3://{bucket}")
    a = write_list(tmp_path, ["s/x.bin", "a/y.bin"], "a.txt")
    b = write_list(tmp_path, ["s/x.bin", "b/z.bin"], "b.txt")
    c = write_list(tmp_path, ["s/x.bin"], "c.txt")
    mp = str(m.mp)
    proxy.reset()
    assert cli("preload", "--file-list", a, "--mount", mp, "--pin").returncode == 0
    assert cli("preload", "--file-list", b, "--mount", mp, "--pin").returncode == 0
    assert proxy.gets() == 4  # z.bin's one chunk for b: x.bin was cached and pinned
    # status says who pins each file
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    st, r = run_json("status", "--file-list", b, "--mount", mp)
    assert {f["path"]: f["pinned_by"] for f in st["files"]} == {
        f"{mp}/s/x.bin": sorted([ra, rb]), f"{mp}/b/z.bin": [rb]}, st
    assert st["pinned_by"] == {ra: {"files": 1, "bytes": 2 * CHUNK},
                               rb: {"files": 2, "bytes": 3 * CHUNK}}, st
    r = cli("status", "--file-list", b, "--mount", mp)
    assert f"pinned by: {rb} (2 files), {ra} (1 file)" in r.stdout.splitlines(), r.stdout
    res, r = run_json("free", "--file-list", b, "--mount", mp)
    assert r.returncode == 0, r.stderr
    assert res["freed_chunks"] == res["pins_removed"] == 1, res  # z.bin's
    assert res["kept_files"] == 1 and res["kept_bytes"] == 2 * CHUNK, res
    assert res["kept_by"] == {os.path.realpath(a): {"files": 1, "bytes": 2 * CHUNK,
                                                    "versions": 0}}, res
    st = m.stats()["cache"]
    assert st["pinned_bytes"] == st["used_bytes"] == 3 * file_size(CHUNK), st
    proxy.reset()
    assert m.path("s/x.bin").read_bytes() == data["s/x.bin"]
    assert proxy.gets() == 0
    # a list nobody pinned keeps them too, and says so
    r = cli("free", "--file-list", c, "--mount", mp)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("freed 0 B (0 chunks, 0 pinned) of 1 file"), \
        r.stdout
    assert (f"  kept 128.0 KiB of 1 file that other data sets pin: {os.path.realpath(a)} "
            "(1 file) (a free of those lists, or with --name, drops them)"
            ) in r.stdout.splitlines(), r.stdout
    # the data set that pinned them frees them (its list spelled another way)
    res, r = run_json("free", "--file-list", "a.txt", "--mount", mp, cwd=tmp_path)
    assert r.returncode == 0 and res["kept_files"] == 0, res
    assert res["freed_chunks"] == res["pins_removed"] == 3, res
    st = m.stats()["cache"]
    assert st["pinned_bytes"] == st["used_bytes"] == 0, st


def test_a_data_set_pinned_twice_or_from_stdin(mounts, bucket, s3, proxy, tmp_path):
    """A list pinned twice is one data set (one free lets go of it); a copy of the list
    frees it by --name; a list read from stdin pins for no data set: it is warned, and a
    free of any list naming those files drops them."""
    put(s3, bucket, {"s/x.bin": 2 * CHUNK, "a/y.bin": CHUNK})
    m = mounts(f"s3://{bucket}")
    mp = str(m.mp)
    a = write_list(tmp_path, ["s/x.bin", "a/y.bin"], "a.txt")
    copy = write_list(tmp_path, ["s/x.bin", "a/y.bin"], "copy.txt")
    for _ in range(2):
        assert cli("preload", "--file-list", a, "--mount", mp, "--pin").returncode == 0
    res, r = run_json("free", "--file-list", copy, "--mount", mp)
    assert res["kept_files"] == 2 and res["freed_chunks"] == 0, res
    res, r = run_json("free", "--file-list", copy, "--mount", mp, "--name", a)
    assert res["kept_files"] == 0 and res["freed_chunks"] == 3, res
    assert m.stats()["cache"]["pinned_bytes"] == 0
    r = cli("preload", "--file-list", "-", "--mount", mp, "--pin", input="s/x.bin\n")
    assert r.returncode == 0, r.stderr
    assert "warning: a list read from stdin or a pipe pins for no data set" in r.stderr, \
        r.stderr
    assert m.stats()["cache"]["pinned_bytes"] == 2 * file_size(CHUNK)
    res, r = run_json("free", "--file-list", copy, "--mount", mp)
    assert res["kept_files"] == 0 and res["freed_chunks"] == 2, res
    assert m.stats()["cache"]["pinned_bytes"] == 0
    for bad, err in ((("--name", ""), "--name: must not be empty"),
                     (("--name", "n" * 1025), "--name: at most 1024 bytes")):
        r = cli("free", "--file-list", copy, "--mount", mp, *bad)
        assert r.returncode == 2 and r.stderr.strip() == f"cachefs: error: {err}", r.stderr


def test_what_another_data_set_pins_is_kept_under_a_directory_and_in_older_versions(
        mounts, bucket, s3, proxy, tmp_path):
    """A free keeps what another data set pins also where the list names a directory and
    the file's name is too long for the directory's range of records (it was dropped), and
    in older versions S3 replaced; a list given through a pipe pins for no data set (its
    path, /proc/PID/fd/..., is another one each time: a free of it kept everything)."""
    long_key = "d/" + "a" * 200 + "/" + "b" * 200 + "/" + "c" * 100  # record key: a hash
    data = put(s3, bucket, {long_key: CHUNK, "d/v.bin": CHUNK})
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    mp = str(m.mp)
    a = write_list(tmp_path, [long_key, "d/v.bin"], "a.txt")
    b = write_list(tmp_path, ["d/"], "b.txt")
    assert cli("preload", "--file-list", a, "--mount", mp, "--pin").returncode == 0
    s3.put_object(Bucket=bucket, Key="d/v.bin", Body=b"v2" * (CHUNK // 2))
    time.sleep(1.2)  # past the metadata TTL
    assert cli("preload", "--file-list", b, "--mount", mp).returncode == 0  # v2, unpinned
    res, r = run_json("free", "--file-list", b, "--mount", mp)
    assert r.returncode == 0, r.stderr
    assert res["kept_files"] == 1 and res["kept_versions"] == 1, res
    assert res["kept_by"] == {os.path.realpath(a): {"files": 1, "bytes": CHUNK,
                                                    "versions": 1}}, res
    assert res["freed_chunks"] == 1 and res["pins_removed"] == 0, res  # v2's chunk
    st = m.stats()["cache"]
    assert st["pinned_bytes"] == st["used_bytes"] == 2 * file_size(CHUNK), st
    proxy.reset()
    assert m.path(long_key).read_bytes() == data[long_key]
    assert proxy.gets() == 0
    r = cli("free", "--file-list", b, "--mount", mp)
    assert (f"  kept 64.0 KiB of 1 file and 1 older version that other data sets pin: "
            f"{os.path.realpath(a)} (1 file and 1 older version) (a free of those lists, or "
            "with --name, drops them)") in r.stdout.splitlines(), r.stdout
    res, r = run_json("free", "--file-list", a, "--mount", mp)
    assert res["kept_files"] == res["kept_versions"] == 0 and res["superseded_versions"] == 1
    assert m.stats()["cache"]["pinned_bytes"] == 0
    # a list through a pipe: no data set, said; and a free through a pipe frees it
    r = cli("preload", "--file-list", "/dev/stdin", "--mount", mp, "--pin",
            input="d/v.bin\n")
    assert r.returncode == 0 and "pins for no data set" in r.stderr, r.stderr
    res, r = run_json("free", "--file-list", "/dev/stdin", "--mount", mp, input="d/\n")
    assert res["kept_files"] == 0 and m.stats()["cache"]["pinned_bytes"] == 0, res
    r = cli("preload", "--file-list", a, "--mount", mp, "--name", "x")
    assert r.returncode == 2 and r.stderr.strip() == \
        "cachefs: error: --name names the data set of --pin: give --pin too", r.stderr


def test_pin_records_written_before_data_sets_had_names_are_anyones():
    """A record of an older cachefs has no holders: nobody named pins its versions, so a
    free of any list naming them drops them, as before; what is not a version is left out,
    with its holders."""
    from cachefs.datasets import _record, _record_of

    assert _record_of(b'{"key": "k", "versions": [["e", 1, 2], ["f", 3, 4]]}') == (
        "k", [["e", 1, 2], ["f", 3, 4]], [[""], [""]])
    assert _record_of(_record("k", [["e", 1, 2], ["bad"], ["f", 3, 4]],
                              [["A"], ["B"], ["A", "C"]])) == (
        "k", [["e", 1, 2], ["f", 3, 4]], [["A"], ["A", "C"]])
    assert _record_of(b'{"key": "k", "versions": [["e", 1, 2]], "holders": [[7]]}')[2] == [[""]]


def test_a_pinning_preload_counts_what_one_under_way_will_pin(mounts, bucket, s3, proxy,
                                                             tmp_path):
    """Two `preload --pin` started together (two training jobs on one host): each checked
    the limit against what was pinned when it started, both passed, and together they
    filled the cache with pinned data past what the check promised. The second now counts
    what the first has yet to pin, and what a run has pinned or ended stops counting."""
    files = {f"a{i}.bin": CHUNK for i in range(5)} | {f"b{i}.bin": CHUNK for i in range(5)} \
        | {f"c{i}.bin": CHUNK for i in range(4)}
    put(s3, bucket, files)
    m = mounts(f"s3://{bucket}", cache_size="640KiB")  # 9 chunk files: 5 + 5 do not fit
    lists = {g: write_list(tmp_path, [k for k in files if k.startswith(g)], f"{g}.txt")
             for g in "abc"}
    proxy.reset()
    proxy.faults(delay=1.0, count=-1)  # a runs 5 s or more
    env = {**os.environ, **CREDS}
    a = subprocess.Popen([sys.executable, "-m", "cachefs", "preload", "--file-list",
                          lists["a"], "--mount", str(m.mp), "--parallel", "1", "--pin"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while m.stats()["in_flight_fetches"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = cli("preload", "--file-list", lists["b"], "--mount", str(m.mp), "--pin")
    assert a.poll() is None  # a was still running
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "being pinned by other preloads" in lines[0], r.stderr
    # the same list again (another job of the same data set): what a will pin is not
    # counted twice, so it fits
    r = cli("preload", "--file-list", lists["a"], "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    _, err = a.communicate(timeout=60)
    assert a.returncode == 0, err
    proxy.clear_faults()
    assert m.stats()["cache"]["pinned_bytes"] == 5 * file_size(CHUNK)
    # a's run is over: only what it pinned counts (4 + 5 chunk files fit)
    res, r = run_json("preload", "--file-list", lists["c"], "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    assert res["cache"]["pinned_bytes"] == 9 * file_size(CHUNK) and not res["uncached_bytes"]


# -- errors -------------------------------------------------------------------------------


def test_file_list_errors(mounts, bucket, s3, proxy, tmp_path):
    put(s3, bucket, DATA)
    missing = str(tmp_path / "nope.txt")
    r = cli("preload", "--file-list", missing)
    assert r.returncode == 2 and r.stderr.strip() == f"cachefs: error: file list {missing}: " \
                                                       "no such file"
    r = cli("status", "--file-list", write_list(tmp_path, ["x"], "x.txt"),
            "--mount", str(tmp_path))
    assert r.returncode == 3 and f"{tmp_path} is not a cachefs mount" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    m = mounts(f"s3://{bucket}")
    lst = write_list(tmp_path, ["data/a.bin", "data/nothing.bin", "# c", "s3://not-ours/k",
                                "data/a.bin/under", "/somewhere/else", "data/\x1b[2J\x9bx.bin"])
    res, r = run_json("preload", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 2
    assert res["files"] == 1 and res["fetched_bytes"] == 200 * KiB
    assert [f["line"] for f in res["failed"]] == [2, 4, 5, 6, 7]
    errs = r.stderr.strip().splitlines()
    assert errs == [
        f"cachefs: {lst}:2: data/nothing.bin: no such file or directory",
        f"cachefs: {lst}:4: s3://not-ours/k: bucket not-ours is not mounted here "
        f"(mounted: s3://{bucket}/)",
        f"cachefs: {lst}:5: data/a.bin/under: not a directory (a file name is used as a "
        "directory)",
        f"cachefs: {lst}:6: /somewhere/else: not under the cachefs mount {m.mp}",
        # control characters in an entry are shown escaped, never written raw
        f"cachefs: {lst}:7: data/\\x1b[2J\\x9bx.bin: no such file or directory",
    ]
    assert res["failed"][-1]["entry"] == "data/\x1b[2J\x9bx.bin"  # --json keeps it as it is
    r = cli("status", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 2 and "total: 1 file," in r.stdout and "100.0%" in r.stdout
    # only bad entries: no file, so no share of one is claimed
    r = cli("status", "--file-list", write_list(tmp_path, ["data/nothing.bin"], "bad.txt"),
            "--mount", str(m.mp))
    assert r.returncode == 2 and r.stdout.splitlines()[-1] == "total: 0 files", r.stdout
    # a list that is all wrong prints the first 50 and says how many more; --json has all
    many = write_list(tmp_path, [f"data/none{i}.bin" for i in range(60)], "many.txt")
    r = cli("status", "--file-list", many, "--mount", str(m.mp))
    errs = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(errs) == 51, r.stderr
    assert errs[49].startswith(f"cachefs: {many}:50: data/none49.bin: no such file")
    assert errs[50] == f"cachefs: {many}: 10 more failed entries not shown (--json lists " \
                       "every one)"
    res, r = run_json("status", "--file-list", many, "--mount", str(m.mp))
    assert r.returncode == 2 and len(res["failed"]) == 60
    r = cli("free", "--file-list", write_list(tmp_path, ["# nothing"], "empty.txt"),
            "--mount", str(m.mp))
    assert r.returncode == 2 and "has no entries" in r.stderr
    # bad input is said first, with no daemon at that mount too (it was exit 3, no daemon)
    r = cli("free", "--file-list", str(tmp_path / "empty.txt"), "--mount", str(tmp_path))
    assert r.returncode == 2 and "has no entries" in r.stderr, r
    # an S3 failure while fetching: that file fails with a reason, exit 1
    proxy.faults(persistent_status=403)
    r = cli("preload", "--file-list", write_list(tmp_path, ["data/b.bin"], "b.txt"),
            "--mount", str(m.mp))
    proxy.clear_faults()
    assert r.returncode == 1 and "b.txt:1: data/b.bin: S3" in r.stderr
    # a directory entry: the line names the file under it that failed (every file of the
    # directory failed on a line that said only "d.txt:1: data/: ...")
    proxy.faults(persistent_status=403, key_filter="data/b.bin")
    r = cli("preload", "--file-list", write_list(tmp_path, ["data/"], "d.txt"),
            "--mount", str(m.mp))
    proxy.clear_faults()
    errs = [ln for ln in r.stderr.splitlines() if "d.txt:1:" in ln]
    assert r.returncode == 1 and len(errs) == 1, r.stderr
    assert errs[0].endswith(f"d.txt:1: data/: {m.mp}/data/b.bin: S3: 403 AccessDenied: "
                            "Injected fault AccessDenied by s3proxy"), errs
    # a listing that S3 refused is an S3 failure (exit 1), not a bad entry (it was exit 2)
    proxy.faults(persistent_status=403, ops=["ListObjects"])
    res, r = run_json("preload", "--file-list", write_list(tmp_path, ["other/"], "o.txt"),
                      "--mount", str(m.mp))
    proxy.clear_faults()
    assert r.returncode == 1 and res["files"] == 0, r.stderr
    assert r.stderr.strip() == f"cachefs: {tmp_path}/o.txt:1: other/: S3 denied the listing " \
                               "(permission denied)", r.stderr


def test_a_list_that_is_not_utf8_text_is_one_line(mounts, bucket, tmp_path):
    """A binary file given as the list printed a line of raw bytes (terminal escapes
    included) for each of its "entries"; now it is refused on one line, and a control
    character in the list's name is shown escaped."""
    m = mounts(f"s3://{bucket}")
    lst = tmp_path / "bin\x1b[31m.lst"
    lst.write_bytes(b"data/a.bin\n# fine so far\n\xf0\x95\x1b[2J\x9b\n" +
                    random.Random(0).randbytes(3000))
    shown = f"{tmp_path}/bin\\x1b[31m.lst"
    for cmd in ("preload", "status", "free"):
        r = cli(cmd, "--file-list", str(lst), "--mount", str(m.mp))
        assert r.returncode == 2, (cmd, r.stderr)
        assert r.stderr == f"cachefs: error: file list {shown}: not UTF-8 text (line 3)\n", cmd
    r = subprocess.run([sys.executable, "-m", "cachefs", "status", "--file-list", "-",
                        "--mount", str(m.mp)],
                       input=b"\xff\xfe\x00\x1b]0;x\x07\n", capture_output=True,
                       env={**os.environ, **CREDS})
    assert r.returncode == 2 and r.stderr == b"cachefs: error: file list <stdin>: not UTF-8 " \
                                             b"text (line 1)\n", r.stderr


def test_a_list_with_nul_bytes_is_one_line_and_a_byte_order_mark_is_skipped(
        mounts, bucket, s3, tmp_path):
    """A tar of JSON samples, or a file of zeros, is valid UTF-8: each "entry" was printed
    whole (20 MB of stderr for 5 MB of zeros). A list saved with a byte order mark (Windows
    editors) made its first line an entry that did not exist."""
    put(s3, bucket, {"a/f0.bin": 10, "a/f1.bin": 10})
    m = mounts(f"s3://{bucket}")
    zeros = tmp_path / "zeros.lst"
    zeros.write_bytes(b"a/f0.bin\n" + bytes(1 << 20))
    for cmd in ("preload", "status", "free"):
        r = cli(cmd, "--file-list", str(zeros), "--mount", str(m.mp))
        assert (r.returncode, r.stderr) == (2, f"cachefs: error: file list {zeros}: not a text "
                                               "file (a NUL byte on line 2)\n"), cmd
    # read a MiB at a time: /dev/zero was read for ever, a large shard whole into memory;
    # the lines are counted across the pieces
    r = cli("status", "--file-list", "/dev/zero", "--mount", str(m.mp), timeout=30)
    assert (r.returncode, r.stderr) == (2, "cachefs: error: file list /dev/zero: not a text "
                                           "file (a NUL byte on line 1)\n")
    long = tmp_path / "long.lst"
    long.write_bytes(b"a/f0.bin\n" * 300_000 + b"a/\xff\n")  # 2.7 MB
    r = cli("status", "--file-list", str(long), "--mount", str(m.mp))
    assert (r.returncode, r.stderr) == (2, f"cachefs: error: file list {long}: not UTF-8 text "
                                           "(line 300001)\n")
    long.write_bytes(b"a/f0.bin\n" * 300_000 + "a/é\0\n".encode())
    r = cli("status", "--file-list", str(long), "--mount", str(m.mp))
    assert (r.returncode, r.stderr) == (2, f"cachefs: error: file list {long}: not a text "
                                           "file (a NUL byte on line 300001)\n")
    bom = tmp_path / "bom.lst"
    bom.write_bytes(b"\xef\xbb\xbfa/f0.bin\r\na/f1.bin\r\n")
    r = cli("status", "--file-list", str(bom), "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    bom.write_bytes(b"\xef\xbb\xbf# my list\r\na/f1.bin\r\n")
    r = cli("status", "--file-list", str(bom), "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr


def test_a_prefix_is_walked_in_name_order_and_keys_may_hold_line_separators(
        mounts, bucket, s3, tmp_path):
    """A directory entry listed its subdirectories last and in reverse (z.txt, shard-001/b,
    shard-000/a), so preloads ran, and status showed, in that order. A key holding \x1c or
    \u2028 (legal in S3) was split into two entries, both "no such file", and every line
    number after it was off."""
    keys = ["p/z.txt", "p/shard-001/b", "p/shard-000/a", "p/m\x1cid.bin", "p/n\u2028l.bin"]
    put(s3, bucket, {k: 10 for k in keys})
    m = mounts(f"s3://{bucket}")
    st, r = run_json("status", "--file-list", write_list(tmp_path, ["p/"]), "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert [f["path"][len(str(m.mp)) + 1:] for f in st["files"]] == [
        "p/m\x1cid.bin", "p/n\u2028l.bin", "p/shard-000/a", "p/shard-001/b", "p/z.txt"]
    lst = write_list(tmp_path, ["p/m\x1cid.bin", "p/n\u2028l.bin", "p/missing", "p/z.txt"])
    st, r = run_json("status", "--file-list", lst, "--mount", str(m.mp))
    assert r.returncode == 2 and len(st["files"]) == 3, (r.stderr, st)
    assert r.stderr.count("no such file") == 1 and "list.txt:3: p/missing" in r.stderr, r.stderr


def test_control_socket_refuses_other_users(mounts, bucket, s3, monkeypatch):
    put(s3, bucket, {"f": 10})
    run = tempfile.mkdtemp(prefix="cachefs-run-")
    monkeypatch.setenv("CACHEFS_RUNTIME_DIR", run)
    m = mounts(f"s3://{bucket}")
    from cachefs import runtime

    sock = runtime.socket_path(m.mp)

    def as_nobody(raw: bool = False) -> str:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, then talk to the socket
            msg = "ok"
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                if raw:  # the daemon's SO_PEERCRED check answers before reading
                    import socket

                    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    c.settimeout(10)
                    c.connect(str(sock))
                    msg = json.loads(c.makefile("rb").readline())["error"]
                else:
                    from cachefs.control import ControlClient

                    ControlClient(sock, str(m.mp)).request({"op": "status", "entries": []})
            except BaseException as e:  # noqa: BLE001
                msg = str(e)
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        return out

    try:
        assert "permission denied on the control socket" in as_nobody()
        # even with the file modes opened up, the daemon checks the peer's uid
        os.chmod(run, 0o711)
        os.chmod(sock.parent, 0o711)
        os.chmod(sock, 0o666)
        assert as_nobody(raw=True) == "permission denied"
    finally:
        os.chmod(run, 0o700)



def test_file_list_over_16_mib(mounts, bucket, s3, tmp_path):
    """A file list of 300k lines (21 MiB) goes to the daemon in one request; above 16 MiB
    it was refused ("request too large").  The limit is now 1 GiB: a million paths of 70
    characters make 70 MiB."""
    keys = [f"frames/{c * 60}.bin" for c in "ab"]
    for k, size in zip(keys, (1000, 500), strict=True):
        s3.put_object(Bucket=bucket, Key=k, Body=b"z" * size)
    m = mounts(f"s3://{bucket}")
    lst = tmp_path / "big.txt"
    lst.write_text("".join(keys[i % 2] + "\n" for i in range(300_000)))
    assert lst.stat().st_size > 20 << 20
    r = cli("status", "--file-list", str(lst), "--mount", str(m.mp), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["total_bytes"] == 1500 and len(res["files"]) == 2, r.stdout[:500]
    # more entries than a command takes files: said at once, as bad input (the daemon said
    # it, exit 1, once it had walked a million of them)
    lst.write_text("".join(f"f{i}\n" for i in range(1_000_001)))
    r = cli("preload", "--file-list", str(lst), "--mount", str(m.mp), timeout=300)
    assert r.returncode == 2 and r.stderr == (
        f"cachefs: error: file list {lst} has 1000001 entries; a command takes at most "
        "1000000 files: split it\n"), r.stderr
