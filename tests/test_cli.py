"""CLI behaviour: one-line errors with non-zero exits, daemon start-up checks, umount."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cachefs_env import CREDS, cli, is_mounted, wait_for

from cachefs.store.chunkstore import file_size


def one_line_error(r, *needles, code: int | None = None):
    assert r.returncode != 0, r
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "WARN" not in ln and ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_repeated_log_messages_are_limited():
    import io
    import logging

    from cachefs.cli import RepeatLimit

    now = [0.0]
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.addFilter(RepeatLimit(clock=lambda: now[0]))
    lg = logging.getLogger("cachefs.test-repeat")
    lg.addHandler(h)
    lg.propagate = False
    try:
        for i in range(100):
            lg.warning("chunk %s: write failed", i)
        lg.warning("another message")
        now[0] = 61.0
        lg.warning("chunk %s: write failed", "x")
    finally:
        lg.removeHandler(h)
    lines = out.getvalue().splitlines()
    assert lines[:9] == [f"chunk {i}: write failed" for i in range(9)]
    assert lines[9] == ("chunk 9: write failed [more like this in the next 60s are counted, "
                        "not logged]")
    assert lines[10:] == ["another message",
                          "chunk x: write failed [90 more like this were not logged]"]


def test_sizes_up_to_exbibytes():
    from cachefs.config import parse_size
    from cachefs.errors import ConfigError
    from cachefs.report import human

    assert parse_size("1EiB", "x") == 1 << 60 and parse_size("2 eb", "x") == 2 * 10**18
    assert human(1 << 60) == "1.0 EiB" and human(parse_size("1.5PiB", "x")) == "1.5 PiB"
    # exact to the byte, however many digits (a float rounded these)
    assert parse_size("18446744073709551615", "x") == (1 << 64) - 1
    assert parse_size("9007199254740993", "x") == 9007199254740993
    assert parse_size("1.5KiB", "x") == 1536 and parse_size("0.001KB", "x") == 1
    assert parse_size("0.3GiB", "x") == 322122547  # whole bytes, rounded down
    for bad, why in (("1.5", "not a whole number of bytes"), ("0.5B", "not a whole number"),
                     ("0.0001KB", "must be positive"), ("1" + "0" * 400, "too large"),
                     ("9" * 5000, "too large"), ("1." + "1" * 5000, "too large")):
        with pytest.raises(ConfigError, match=why):
            parse_size(bad, "x")


def test_a_trace_offset_of_zero_may_carry_a_unit():
    """`trace PATH --offset 0` read from the start, `--offset 0B` or `0KiB` was refused
    ("must be positive"); a length of 0 stays refused, and so does a unit that is none."""
    from cachefs.cli_trace import _offset
    from cachefs.errors import ConfigError

    for v in ("0", "0B", "0KiB", " 0 MiB", "0.0GiB"):
        assert _offset(v, "--offset", zero=True) == 0, v
    assert _offset("8MiB", "--offset", zero=True) == 8 << 20
    with pytest.raises(ConfigError, match="expected a size like 500GiB or 8MiB, got '0XB'"):
        _offset("0XB", "--offset", zero=True)
    with pytest.raises(ConfigError, match="must be positive"):
        _offset("0KiB", "--length")


def test_an_unset_variable_a_forgotten_argument_or_a_url_with_credentials(tmp_path):
    """What a shell script's slips make of the command line: each is a one-line error."""
    mp = tmp_path / "mp"
    mp.mkdir()
    base = ("--cache-dir", str(tmp_path / "c"), "--cache-size", "1GiB")
    lst = tmp_path / "list.txt"
    lst.write_text("a.bin\n")
    # "$MNT" unset: an empty MOUNTPOINT was the current directory, and an empty --mount
    # "the only mount" (a `free` of the wrong data set)
    one_line_error(cli("mount", "s3://bucket-x", "", *base), "MOUNTPOINT is empty", code=2)
    one_line_error(cli("umount", ""), "MOUNTPOINT is empty", code=2)
    for cmd in (("stats",), ("trace", "--recent", "1"), ("trace", "a.bin"),
                ("free", "--file-list", str(lst)), ("status", "--file-list", str(lst))):
        one_line_error(cli(*cmd, "--mount", ""), "--mount: the path is empty", code=2)
    # the mountpoint forgotten after --config: the URL was taken for it
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n")
    one_line_error(cli("mount", "--config", str(cfg), "s3://bucket-x"),
                   "no MOUNTPOINT after the s3:// source", code=2)
    # credentials in the source are neither used nor repeated (the error goes to a journal)
    for src in ("s3://AKIAEXAMPLE:wJalrSECRET@bkt/train", "s3://AKIA:wJal/rSECRET@bkt"):
        r = cli("mount", src, str(mp), *base)  # (a secret key may hold a "/")
        one_line_error(r, "must not carry credentials", code=2)
        assert "rSECRET" not in r.stdout + r.stderr
        r = cli("mount", "--config", str(cfg), src)  # and the MOUNTPOINT forgotten
        one_line_error(r, "no MOUNTPOINT after the s3:// source", code=2)
        assert "rSECRET" not in r.stdout + r.stderr
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n[[mount]]\n"
                   "source = 's3://KEY:SECRET9@bkt'\n")
    r = cli("mount", "--config", str(cfg), str(mp))
    one_line_error(r, "must not carry credentials", code=2)
    assert "SECRET9" not in r.stdout + r.stderr
    # an error names the flag given, or the key of the file that gave it
    one_line_error(cli("mount", "s3://bucket-x", str(mp), *base, "--etcd-cert", "/etc/hostname",
                       "--no-allow-other"),
                   "--etcd-cert and [cluster] etcd_key go together", code=2)
    one_line_error(cli("mount", "s3://bucket-x", str(mp), "--cache-size", "1GiB",
                       "--cache-dir", "~no-such-user-here/c"), "--cache-dir: '~no-such", code=2)
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n[cluster]\n"
                   "peers = ['a:1']\n")
    one_line_error(cli("mount", "--config", str(cfg), "s3://bucket-x", str(mp)),
                   "[cluster] peers needs --peer-listen", code=2)
    # cluster settings without a cluster, a host name with a space
    one_line_error(cli("mount", "s3://bucket-x", str(mp), *base, "--peer-advertise", "h:1"),
                   "--peer-advertise is for a cluster", code=2)
    one_line_error(cli("mount", "s3://bucket-x", str(mp), *base, "--peer-listen", "a b:7070",
                       "--peers", "a:7070", env={"CACHEFS_PEER_SECRET": "s" * 32}),
                   "peer listen address: expected HOST:PORT", code=2)
    # [mount] for [[mount]]: "nothing to mount"
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n[mount]\n"
                   "source = 's3://bkt'\n")
    one_line_error(cli("mount", "--config", str(cfg), str(mp)),
                   "mount must be [[mount]] tables (double brackets: one per bucket), not a "
                   "[mount] table", code=2)
    # --slow was taken and ignored with --follow
    one_line_error(cli("trace", "--follow", "--slow"), "--slow goes with --recent", code=2)


def test_bad_cli_input(tmp_path):
    mp = tmp_path / "mp"
    mp.mkdir()
    base = ["mount", "s3://bucket-x", str(mp), "--cache-dir", str(tmp_path / "c")]
    one_line_error(cli(*base), "cache size")
    one_line_error(cli(*base, "--cache-size", "lots"), "cache size")
    one_line_error(cli(*base, "--cache-size", "1GiB", "--chunk-size", "1"), "chunk size")
    one_line_error(cli("mount", "http://x", str(mp), "--cache-dir", "/tmp/c",
                       "--cache-size", "1GiB"), "s3://")
    one_line_error(cli("mount", "s3://a/../b", str(mp), "--cache-dir", "/tmp/c",
                       "--cache-size", "1GiB"), "bucket")
    one_line_error(cli(*base, "--cache-size", "1GiB", "--no-such-flag"), "no-such-flag")
    one_line_error(cli(*base, "--cache-size", "1GiB", "--high-watermark", "0.5",
                       "--low-watermark", "0.7"), "watermark")
    one_line_error(cli(*base, "--cache-size", "1GiB", "--prefetch-files", "-1"), "prefetch files")
    # flags take what the config file takes: "90%" is a watermark (its order is wrong here)
    one_line_error(cli(*base, "--cache-size", "1GiB", "--high-watermark", "80%",
                       "--low-watermark", "90%"), "0 < low < high", code=2)
    # values that cannot work are bad input, not an S3 failure after a start
    one_line_error(cli(*base, "--cache-size", "1GiB", "--s3-timeout", "0s"),
                   "s3 request timeout: must be more than 0", code=2)
    # every lookup would list each directory of its path again (`ls -l` of 300 files: 62 s)
    for ttl in ("0", "1ms"):
        one_line_error(cli(*base, "--cache-size", "1GiB", "--metadata-ttl", ttl),
                       "metadata ttl: must be at least 1s", code=2)
    # a region botocore refuses failed the mount after its start (exit 1: restarted)
    one_line_error(cli(*base, "--cache-size", "1GiB", "--region", "us east 1"),
                   "--region: 'us east 1' is not a region name", code=2)
    for url in ("127.0.0.1:9000", "ftp://127.0.0.1:9000", "http://", "http://h:port"):
        one_line_error(cli(*base, "--cache-size", "1GiB", "--endpoint-url", url),
                       "expected http://host:port", code=2)
    one_line_error(cli("umount", "--timeout", "-1", str(mp)), "timeout", code=2)
    one_line_error(cli("trace", "--recent", "0"), "--recent", code=2)
    for etcd in ("ftp://10.0.0.1:2379", "10.0.0.1:port", "http://"):
        one_line_error(cli(*base, "--cache-size", "1GiB", "--peer-listen", "127.0.0.1:7070",
                           "--etcd", f"http://10.0.0.2:2379,{etcd}",
                           env={"CACHEFS_PEER_SECRET": "s" * 32}),
                       "etcd endpoint", code=2)
    one_line_error(cli("demo", "--shards", "-1"), "--shards", code=2)
    one_line_error(cli("demo", "--shards", "1", "--shard-size", "1TiB", "--small-files", "0"),
                   "available memory", code=2)
    one_line_error(cli("mount", str(mp)), "config")
    one_line_error(cli("mount", "--config", str(tmp_path / "none.toml"), str(mp)), "not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nsize = 'x'\nbogus = 1\n")
    one_line_error(cli("mount", "--config", str(bad), str(mp)), "bogus")
    bad.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[read]\nprefetch_files = 'many'\n")
    one_line_error(cli("mount", "--config", str(bad), "s3://bucket-x", str(mp)), "prefetch files")
    # a wrong type or unit in the file: one line naming the setting, never a traceback
    for table, line, needle in (
            ("read", "readahead_chunks = 'x'", "readahead chunks"),
            ("read", "kernel_read_ahead_kb = 64", "kernel_read_ahead_kb: expected 128 to"),
            ("read", "kernel_read_ahead_kb = '1MiB'", "kernel_read_ahead_kb"),
            ("read", "page_cache = 'off'", "page_cache: expected true or false"),
            ("cluster", "lease_ttl = 'ten'\npeer_listen = '127.0.0.1:7070'", "lease_ttl"),
            ("cluster", "peer_listen = 7070", "peer listen address"),
            ("trace", "metrics_listen = 9100", "metrics listen address"),
            ("trace", "otlp_endpoint = 4318", "otlp_endpoint")):
        bad.write_text(f"[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[{table}]\n{line}\n")
        one_line_error(cli("mount", "--config", str(bad), "s3://bucket-x", str(mp)), needle)
    # a source on the command line would silently drop the file's mount tables
    tables = tmp_path / "tables.toml"
    tables.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[[mount]]\n"
                      "source = 's3://bucket-y'\nendpoint_url = 'http://127.0.0.1:9'\n")
    one_line_error(cli("mount", "s3://bucket-x", str(mp), "--config", str(tables)),
                   f"s3://bucket-x on the command line and the [[mount]] tables of {tables} "
                   "cannot be combined", code=2)
    bad.write_bytes(b"[cache]\nsize = '\xff'\n")
    one_line_error(cli("mount", "--config", str(bad), str(mp)), "not UTF-8")
    # values that raised inside Python: "internal error" and exit 1
    one_line_error(cli(*base, "--cache-size", "1" + "0" * 400), "cache size: '1000", code=2)
    one_line_error(cli("mount", "s3://bucket-x", str(mp), "--cache-size", "1GiB",
                       "--cache-dir", "~no-such-user-here/c"),
                   "'~no-such-user-here/c': no such user's home directory", code=2)
    # read-ahead that could never start (the chunk being read takes the memory)
    one_line_error(cli(*base, "--cache-size", "1GiB", "--readahead-memory", "8MB"),
                   "read-ahead memory 8000000 bytes holds less than two chunks", code=2)
    # a mount's name becomes a directory name
    for name in ("a\\nb", "x" * 200 + "é" * 30):
        bad.write_text(f"[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[[mount]]\nname = \"{name}\"\n"
                       "source = 's3://bucket-x'\n")
        one_line_error(cli("mount", "--config", str(bad), str(mp)), "invalid name", code=2)
    # a flag would send every bucket of the mount table to one endpoint (region, profile)
    two = ("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[[mount]]\nsource = 's3://bucket-x'\n"
           "endpoint_url = 'http://127.0.0.1:9001'\nregion = 'eu-west-1'\n"
           "[[mount]]\nsource = 's3://bucket-y'\n")
    bad.write_text(two)
    for flag, value in (("--endpoint-url", "http://127.0.0.1:9002"), ("--region", "us-east-2")):
        one_line_error(cli("mount", "--config", str(bad), str(mp), flag, value),
                       f"{flag} would replace the {flag[2:].replace('-', '_')} of [[mount]] #1 "
                       "(s3://bucket-x)", code=2)
    # a secret written without quotes is not repeated in the error (it goes to the journal)
    bad.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[cluster]\n"
                   "peer_listen = '127.0.0.1:7070'\npeers = ['127.0.0.1:7070']\n"
                   "peer_secret = 987654321987654321\n")
    r = cli("mount", "--config", str(bad), "s3://bucket-x", str(mp))
    one_line_error(r, "[cluster] peer_secret: expected a string, got a TOML int", code=2)
    assert "987654321" not in r.stdout + r.stderr
    bad.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\nhigh_watermark = 'ninety'\n")
    one_line_error(cli("mount", "--config", str(bad), "s3://bucket-x", str(mp)), "high watermark")
    # a percentage is a fraction
    bad.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\nhigh_watermark = '50%'\n"
                   "low_watermark = '70%'\n")
    one_line_error(cli("mount", "--config", str(bad), "s3://bucket-x", str(mp)),
                   "0 < low < high")
    # a secret in a flag would be in the process list
    one_line_error(cli(*base, "--cache-size", "1GiB", "--otlp-endpoint",
                       "https://user:pw@collector:4318"), "CACHEFS_OTLP_ENDPOINT")
    one_line_error(cli(*base, "--cache-size", "1GiB", "--otlp-endpoint", "notaurl"),
                   "--otlp-endpoint: expected http://host:port", code=2)
    one_line_error(cli(*base, "--cache-size", "1GiB", env={"CACHEFS_OTLP_ENDPOINT": "x:1"}),
                   "CACHEFS_OTLP_ENDPOINT: expected http://host:port", code=2)
    # S3 credentials come from the AWS chain, never from a URL: refused wherever an S3
    # endpoint is given, and the error never repeats them
    secret_url = "http://AKIA:SECRETPW@127.0.0.1:5731"
    r = cli(*base, "--cache-size", "1GiB", "--endpoint-url", secret_url)
    one_line_error(r, "--endpoint-url: an S3 endpoint URL must not carry credentials", code=2)
    assert "SECRETPW" not in r.stderr + r.stdout
    for where, text in (
            ("[s3] endpoint_url", f"[s3]\nendpoint_url = '{secret_url}'\n"),
            ("[[mount]] #2 endpoint_url",
             "[[mount]]\nsource = 's3://bucket-x'\n"
             f"[[mount]]\nsource = 's3://bucket-y'\nendpoint_url = '{secret_url}'\n")):
        bad.write_text(f"[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n{text}")
        r = cli("mount", "--config", str(bad), str(mp))
        one_line_error(r, f"{where}: an S3 endpoint URL must not carry credentials", code=2)
        assert "SECRETPW" not in r.stderr + r.stdout
    # etcd's password comes from CACHEFS_ETCD_PASSWORD (user: --etcd-user), never a URL
    cluster = (*base, "--cache-size", "1GiB", "--peer-listen", "127.0.0.1:7999")
    for etcd in ("http://root:SECRETPW@127.0.0.1:2379",
                 "http://127.0.0.1:2379,root:SECRETPW@h:2379"):  # HOST:PORT, no scheme
        r = cli(*cluster, "--etcd", etcd)
        one_line_error(r, "--etcd: an etcd endpoint URL must not carry credentials",
                       "--etcd-user", "CACHEFS_ETCD_PASSWORD", code=2)
        assert "SECRETPW" not in r.stderr + r.stdout
    bad.write_text("[cache]\nsize = '1GiB'\ndir = '/tmp/c'\n[cluster]\n"
                   "peer_listen = '127.0.0.1:7999'\netcd = ['https://root:SECRETPW@h:2379']\n")
    r = cli("mount", "--config", str(bad), "s3://bucket-x", str(mp))
    one_line_error(r, "[cluster] etcd: an etcd endpoint URL must not carry credentials", code=2)
    assert "SECRETPW" not in r.stderr + r.stdout
    one_line_error(cli(*base, "--cache-size", "1GiB", "--endpoint-url", "http://[::1"),
                   "expected http://host:port", code=2)
    # a cache dir or log file that cannot be one is bad input, and leaves nothing behind
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(cli(*base[:3], "--cache-dir", str(afile), "--cache-size", "1GiB"),
                   f"cache dir {afile} is not a directory", code=2)
    fresh = tmp_path / "fresh" / "cache"
    for log_file, needle in ((tmp_path / "nodir" / "x.log", "does not exist"),
                             (tmp_path, f"log file {tmp_path} is a directory"),
                             (afile / "x.log", f"{afile} is not a directory")):
        one_line_error(cli(*base[:3], "--cache-dir", str(fresh), "--cache-size", "1GiB",
                           "--log-file", str(log_file)), needle, code=2)
        assert not (tmp_path / "fresh").exists()
    one_line_error(cli("nosuchcommand"), "nosuchcommand")
    r = cli()  # no command: the help, not an error of many lines
    assert r.returncode == 2 and r.stdout.startswith("Usage: cachefs") and not r.stderr, r
    one_line_error(cli("umount", str(mp)), "not mounted", code=3)
    one_line_error(cli("stats", "--mount", str(mp)), f"{mp} is not a cachefs mount", code=3)
    one_line_error(cli("stats", "--mount", str(mp / "x")), f"{mp / 'x'} does not exist",
                   code=2)
    one_line_error(cli("umount", str(mp), "--timeout", "nan"), "--timeout", code=2)
    # (was "no cachefs daemon": the length is checked before a daemon is looked for)
    one_line_error(cli("trace", str(mp / "f"), "--length", "0"),
                   "--length: must be positive", code=2)
    one_line_error(cli(*base, "--cache-size", "1GiB", env={"CACHEFS_START_TIMEOUT": "nan"}),
                   "CACHEFS_START_TIMEOUT: expected seconds", code=2)
    # a runtime dir that cannot hold a control socket: said before anything is made
    afile = tmp_path / "afile"
    afile.write_text("")
    for rt, needle in (("rel/dir", "CACHEFS_RUNTIME_DIR must be an absolute path"),
                       ("/tmp/" + "r" * 80, "CACHEFS_RUNTIME_DIR is too long"),
                       (str(afile), f"{afile} is not a directory")):
        one_line_error(cli(*base, "--cache-size", "1GiB", env={"CACHEFS_RUNTIME_DIR": rt}),
                       needle, code=2)
        assert not (tmp_path / "c").exists() and not Path("/tmp/" + "r" * 80).exists()
    r = cli("--help")
    assert r.returncode == 0 and "mount" in r.stdout


S3_CREDS_REFUSED = ("an S3 endpoint URL must not carry credentials (user:password@); they "
                    "come from the AWS chain (environment, profile, instance role)")
BAD_URL = "expected http://host:port or https://host"


def test_endpoint_credentials_without_a_scheme_are_refused_and_never_repeated(tmp_path):
    """user:password@host:port with no scheme (or a password holding '/') is refused
    like http://user:password@ is, naming the setting; and an endpoint that is not a
    URL is named by its setting, never quoted (it may hold a secret, and under systemd
    the error goes to the journal)."""
    mp = tmp_path / "mp"
    mp.mkdir()
    base = ("mount", "s3://bucket-x", str(mp), "--cache-dir", str(tmp_path / "c"),
            "--cache-size", "1GiB")
    for url in ("AKIAEXAMPLE:SECRETPW@s3.internal:9000", "user:SECRETPW@127.0.0.1:9000",
                "AKIASECRETPW@s3.internal:9000", "http://AKIA:SECRET/PW@127.0.0.1:9000"):
        r = cli(*base, "--endpoint-url", url)
        assert one_line_error(r, code=2) == f"cachefs: error: --endpoint-url: {S3_CREDS_REFUSED}"
        assert "SECRET" not in r.stderr + r.stdout
    cfg = tmp_path / "c.toml"
    secret_url = "AKIAEXAMPLE:SECRETPW@s3.internal:9000"
    for where, text in (
            ("[s3] endpoint_url", f"[s3]\nendpoint_url = '{secret_url}'\n"),
            ("config: [[mount]] #1 endpoint_url",
             f"[[mount]]\nsource = 's3://bucket-y'\nendpoint_url = '{secret_url}'\n")):
        cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n{text}")
        r = cli("mount", "--config", str(cfg), str(mp))
        assert one_line_error(r, code=2) == f"cachefs: error: {where}: {S3_CREDS_REFUSED}"
        assert "SECRET" not in r.stderr + r.stdout
    # an endpoint that is no URL: the setting is named, the value is not repeated
    r = cli(*base, "--endpoint-url", "ftp://s3.internal:9000/SECRETPW")
    assert one_line_error(r, code=2) == f"cachefs: error: --endpoint-url: {BAD_URL}"
    assert "SECRET" not in r.stderr + r.stdout
    for where, text in (
            ("[s3] endpoint_url", "[s3]\nendpoint_url = 's3.internal:9000/SECRETPW'\n"),
            ("config: [[mount]] #1 endpoint_url",
             "[[mount]]\nsource = 's3://bucket-y'\nendpoint_url = 'SECRETPW:9000'\n")):
        cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n{text}")
        r = cli("mount", "--config", str(cfg), str(mp))
        assert one_line_error(r, code=2) == f"cachefs: error: {where}: {BAD_URL}"
        assert "SECRET" not in r.stderr + r.stdout
    # CACHEFS_OTLP_ENDPOINT may carry a secret (it is where one goes): never repeated
    r = cli(*base, env={"CACHEFS_OTLP_ENDPOINT": "user:SECRETPW@collector:4318"})
    assert one_line_error(r, code=2) == f"cachefs: error: CACHEFS_OTLP_ENDPOINT: {BAD_URL}"
    assert "SECRET" not in r.stderr + r.stdout
    r = cli(*base, "--otlp-endpoint", "user:SECRETPW@collector:4318")
    assert one_line_error(r, code=2) == (
        "cachefs: error: --otlp-endpoint: a URL with credentials would be visible in the "
        "process list; give it in CACHEFS_OTLP_ENDPOINT or as [trace] otlp_endpoint in the "
        "config file")
    assert "SECRET" not in r.stderr + r.stdout
    # etcd: the same, and a malformed endpoint is named by its place in the list
    cluster = (*base, "--peer-listen", "127.0.0.1:7999")
    env = {"CACHEFS_PEER_SECRET": "s" * 32}
    r = cli(*cluster, "--etcd", "http://127.0.0.1:2379,root:SECRET/PW@h:2379", env=env)
    assert one_line_error(r, code=2) == (
        "cachefs: error: --etcd: an etcd endpoint URL must not carry credentials "
        "(user:password@); give the user with --etcd-user ([cluster] etcd_user) and the "
        "password in CACHEFS_ETCD_PASSWORD")
    assert "SECRET" not in r.stderr + r.stdout
    r = cli(*cluster, "--etcd", "http://127.0.0.1:2379,ftp://h:2379/SECRETPW", env=env)
    assert one_line_error(r, code=2) == (
        f"cachefs: error: --etcd: etcd endpoint #2: {BAD_URL}")
    assert "SECRET" not in r.stderr + r.stdout
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n[cluster]\n"
                   "peer_listen = '127.0.0.1:7999'\npeer_secret = 'ssssssssssssssss'\n"
                   "etcd = ['http://h:port/SECRETPW']\n")
    r = cli("mount", "--config", str(cfg), "s3://bucket-x", str(mp))
    assert one_line_error(r, code=2) == (
        f"cachefs: error: [cluster] etcd: etcd endpoint #1: {BAD_URL}")
    assert "SECRET" not in r.stderr + r.stdout


ADVERTISE_BAD = ("expected HOST:PORT that other nodes can connect to (a host name or "
                 "address, and a port from 1 to 65535), got ")


def test_a_bad_peer_advertise_address_is_bad_input(tmp_path, monkeypatch):
    """--peer-advertise, [cluster] advertise and CACHEFS_PEER_ADVERTISE are checked with
    the rest of the configuration (one line naming the setting, exit 2), not by the
    daemon, where ':17071' used to end as 'daemon failed: ExceptionGroup: ...', exit 1."""
    mp = tmp_path / "mp"
    mp.mkdir()
    cluster = ("--peer-listen", "127.0.0.1:7999", "--peers", "127.0.0.1:7999")
    base = ("mount", "s3://bucket-x", str(mp), "--cache-dir", str(tmp_path / "c"),
            "--cache-size", "1GiB", "--endpoint-url", "http://127.0.0.1:9", *cluster)
    env = {"CACHEFS_PEER_SECRET": "s" * 32}
    for value in (":17071", "gpu-07:0", "0.0.0.0:7070", "[::]:7070", "gpu-07:70000",
                  "gpu-07", "gpu-07:x"):
        r = cli(*base, "--peer-advertise", value, env=env)
        assert one_line_error(r, code=2) == \
            f"cachefs: error: --peer-advertise: {ADVERTISE_BAD}{value!r}", value
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\nadvertise = ':17071'\n")
    r = cli(*base, "--config", str(cfg), env=env)
    assert one_line_error(r, code=2) == \
        f"cachefs: error: [cluster] advertise: {ADVERTISE_BAD}':17071'"
    # the environment wins over both, and is checked too (its control characters escaped)
    for value in (":17071", "\x1b]0;owned\x07:7070"):
        r = cli(*base, "--peer-advertise", "gpu-07:7070", env={**env,
                                                              "CACHEFS_PEER_ADVERTISE": value})
        assert one_line_error(r, code=2) == \
            f"cachefs: error: CACHEFS_PEER_ADVERTISE: {ADVERTISE_BAD}{value!r}"
        assert "\x1b" not in r.stderr
    # good addresses pass (a name, an IPv4 or a bracketed IPv6 address)
    from cachefs.config import build_config

    monkeypatch.setenv("CACHEFS_PEER_SECRET", "s" * 32)
    monkeypatch.setenv("CACHEFS_PEER_ADVERTISE", "10.0.0.7:7070")
    for value in ("gpu-07:7070", "10.0.0.7:7070", "[fd00::7]:7070"):
        c = build_config(mountpoint=str(mp), source="s3://bucket-x", flags={
            "cache_dir": str(tmp_path / "c"), "cache_size": "1GiB", "peer_advertise": value,
            "peer_listen": "0.0.0.0:7999", "peers": "gpu-07:7999"})
        assert c.cluster.advertise == value


def test_a_daemon_failure_names_the_exception_inside_trio_groups():
    """An unexpected error inside the daemon's (nested) nurseries is reported as the error
    itself, on one line: 'ValueError: ...', not 'ExceptionGroup: Exceptions from Trio
    nursery (1 sub-exception)'."""
    import trio

    from cachefs.cli import daemon_failure

    async def fail() -> None:
        raise ValueError("bad port in peer address ':17071'\x1b[2J")

    async def main() -> None:
        async with trio.open_nursery() as outer:
            async def inner() -> None:
                async with trio.open_nursery() as n:
                    n.start_soon(fail)
            outer.start_soon(inner)

    with pytest.raises(BaseExceptionGroup) as ei:
        trio.run(main)
    assert daemon_failure(ei.value) == "ValueError: bad port in peer address ':17071'\\x1b[2J"
    assert daemon_failure(OSError("disk gone")) == "OSError: disk gone"


def test_config_values_of_the_wrong_type(tmp_path):
    """A setting of the wrong type (a number for a path, a string for a boolean, nan for a
    duration) is bad input named on one line.  They were internal errors (exit 1), and
    `allow_other = "false"` turned allow_other on."""
    mp = tmp_path / "mp"
    mp.mkdir()
    cfg = tmp_path / "c.toml"
    head = f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n"
    for text, needle in (
            ("[cache]\nsize = '1GiB'\ndir = 5\n", "[cache] dir: expected a path"),
            (head + "[fuse]\nallow_other = 'false'\n",
             "[fuse] allow_other: expected true or false, got 'false'"),
            (head + "[fuse]\nallow_other = 1\n", "[fuse] allow_other: expected true or false"),
            (head + "[log]\nfile = 5\n", "[log] file: expected a path"),
            (head + "[s3]\nregion = 5\n", "[s3] region: expected a string"),
            (head + "[s3]\nmax_concurrency = 0\n", "s3 max_concurrency must be >= 1"),
            (head + "[metadata]\nttl = nan\n", "metadata ttl: expected a duration"),
            (head + "[metadata]\nattr_timeout = inf\n", "attr timeout: expected a duration"),
            (head + "[metadata]\nnegative_ttl = '100ms'\n", "negative ttl: must be at least 1s"),
            (head + "[s3]\nrequest_timeout = nan\n", "s3 request timeout: expected a duration"),
            (head + "[cluster]\nlease_ttl = nan\n", "[cluster] lease_ttl: expected a duration"),
            # absurd values: a socket time-out past C's time types, a retry budget summed
            # over 1e23 attempts at start, peers never given time to answer
            (head + "[metadata]\nttl = 1e300\n", "metadata ttl: must be at most 87600h"),
            (head + "[s3]\nrequest_timeout = '99999999999999999999h'\n",
             "s3 request timeout: must be at most 87600h"),
            (head + "[s3]\nmax_attempts = '99999999999999999999999'\n",
             "s3 max_attempts must be 1 to 100"),
            (head + "[cluster]\npeer_timeout = 0\n", "peer timeout: must be more than 0"),
            (head + "[cluster]\nnode_id = 7\n", "[cluster] node_id: expected a string"),
            (head + "[cluster]\npeer_listen = '127.0.0.1:7070'\npeers = 5\n",
             "[cluster] peers: expected a list"),
            (head + "[cluster]\npeer_listen = '127.0.0.1:7070'\npeers = [5]\n",
             "[cluster] peers: expected a list"),
            # what an error names is where the value came from (the file, here)
            (head + "[cluster]\npeer_listen = '127.0.0.1:7070'\npeers = ['a:x']\n",
             "[cluster] peers: bad port")):
        cfg.write_text(text)
        one_line_error(cli("mount", "--config", str(cfg), "s3://bucket-x", str(mp)), needle,
                       code=2)
    cfg.write_text(head + "[[mount]]\nsource = 5\n")
    one_line_error(cli("mount", "--config", str(cfg), str(mp)),
                   "[[mount]] #1 source: expected a string", code=2)
    # an empty endpoint of a [[mount]] (a template's unset variable) sent it to [s3]'s, or
    # to AWS; a region botocore refuses failed after the start
    for key, needle in (("endpoint_url = ''", "[[mount]] #1 endpoint_url is empty"),
                        ("region = 'us_east_1'", "[[mount]] #1 region: 'us_east_1' is not")):
        cfg.write_text(head + f"[[mount]]\nsource = 's3://bucket-x'\n{key}\n")
        one_line_error(cli("mount", "--config", str(cfg), str(mp)), needle, code=2)
    # ... and the flag's name where a flag gave it
    one_line_error(cli("mount", "s3://bucket-x", str(mp), "--cache-dir", str(tmp_path / "c"),
                       "--cache-size", "1GiB", "--peer-listen", "127.0.0.1:7070",
                       "--etcd", "http://127.0.0.1:2379", "--etcd-ca", "/nonexistent/ca.pem"),
                   "--etcd-ca: cannot read", code=2)
    assert not (tmp_path / "c").exists()


def test_relative_paths_in_a_config_file_are_taken_from_its_directory(tmp_path, monkeypatch):
    """`[cache] dir = "cache"` meant ./cache of wherever the mount was started (/ under
    systemd); it is now the config file's directory's, as a flag's path is the current
    directory's."""
    from cachefs.config import build_config

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "ca.pem").write_text("x")
    cfg = etc / "cachefs.toml"
    cfg.write_text("[cache]\nsize = '1GiB'\ndir = 'cache'\n[log]\nfile = 'logs/d.log'\n"
                   "[cluster]\nnode_id = 'n1'\npeer_listen = '127.0.0.1:7070'\n"
                   "etcd = ['https://127.0.0.1:2379']\netcd_ca = 'ca.pem'\n")
    monkeypatch.setenv("CACHEFS_PEER_SECRET", "s" * 32)
    monkeypatch.chdir(tmp_path)  # not the file's directory
    c = build_config(mountpoint="mp", source="s3://bkt", config_file=str(cfg))
    assert (c.cache_dir, c.log_file) == (etc / "cache", etc / "logs" / "d.log")
    assert c.cluster.etcd_ca == str(etc / "ca.pem")
    c = build_config(mountpoint="mp", source="s3://bkt", config_file=str(cfg),
                     flags={"cache_dir": "here", "log_file": "x.log"})
    # (absolute: the daemon changes directory to /)
    assert (c.cache_dir, c.log_file) == (tmp_path / "here", tmp_path / "x.log")
    assert c.mountpoint == tmp_path / "mp"


def test_an_only_mount_with_an_empty_name_is_the_mountpoints_top(s3, bucket, proxy,
                                                                  tmp_path, mounts):
    """A config file's [[mount]] was always a directory under the mountpoint: the packaged
    `cachefs@train` served its data at /mnt/train/train/ while its docs said /mnt/train.
    `name = ""` on a config's only [[mount]] puts its files at the top, as an s3:// source
    on the command line does; with several mounts it is refused."""
    from cachefs.config import ConfigError, build_config

    s3.put_object(Bucket=bucket, Key="train/x.bin", Body=b"x-bytes")
    cfg = tmp_path / "cachefs.toml"
    table = f'[[mount]]\nname = ""\nsource = "s3://{bucket}/train"\n'
    cfg.write_text(f'[s3]\nendpoint_url = "{proxy.url}"\n' + table)
    m = mounts("", config=str(cfg), endpoint="")
    assert sorted(os.listdir(m.mp)) == ["x.bin"]
    assert (m.mp / "x.bin").read_bytes() == b"x-bytes"
    cfg.write_text(table + f'[[mount]]\nsource = "s3://{bucket}"\n[cache]\nsize = "1GiB"\n'
                   'dir = "/tmp/c"\n')
    with pytest.raises(ConfigError, match=r"#1: an empty name .* is for a config's only "):
        build_config(mountpoint=str(tmp_path), source=None, config_file=str(cfg))


@pytest.mark.fuse
def test_a_mount_rides_out_s3_throttling_its_first_listing(s3, bucket, proxy, tmp_path,
                                                          mounts):
    """Nodes mounting at once meet SlowDown: the mount's first listing was one request,
    and one 503 failed the mount. It is retried while S3 answers that it is busy; what
    persists still fails, in one line."""
    s3.put_object(Bucket=bucket, Key="a.bin", Body=b"a-bytes")
    proxy.reset()
    proxy.faults(status=503, code="SlowDown", ops=["ListObjects"], count=2)
    m = mounts(f"s3://{bucket}")
    assert (m.mp / "a.bin").read_bytes() == b"a-bytes"
    assert proxy.stats()["ops"]["ListObjects"] >= 3
    mp = tmp_path / "mp2"
    mp.mkdir()
    proxy.faults(persistent_status=503, code="SlowDown", ops=["ListObjects"])
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(tmp_path / "c2"),
                       "--cache-size", "64MiB", "--endpoint-url", proxy.url,
                       "--s3-max-attempts", "2"),
                   f"S3 endpoint {proxy.url} answered 503 SlowDown", code=1)
    proxy.clear_faults()


@pytest.mark.fuse
def test_mount_failures_are_one_line(s3, bucket, proxy, tmp_path, mounts):
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = ["--cache-dir", str(tmp_path / "c"), "--cache-size", "64MiB",
             "--endpoint-url", proxy.url]
    # what the daemon finds wrong reaches the command with its exit code
    one_line_error(cli("mount", f"s3://{bucket}", str(tmp_path / "missing"), *cache),
                   "does not exist", code=2)
    # the cache dir this command created for it is not left behind
    assert not (tmp_path / "c").exists()
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli("mount", f"s3://{bucket}", str(f), *cache), "not a directory", code=2)
    one_line_error(cli("mount", f"s3://{bucket}", "/proc/sys", *cache),
                   "on the kernel's proc file system", code=2)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), *cache, "--profile", "nosuch"),
                   "profile", code=2)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), *cache, "--peers", "garbage",
                       "--peer-listen", "127.0.0.1:0", env={"CACHEFS_PEER_SECRET": "s" * 32}),
                   "--peers", code=2)
    one_line_error(cli("mount", "s3://no-such-bucket-here", str(mp), *cache),
                   "no-such-bucket-here", "does not exist", code=1)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(tmp_path / "c"),
                       "--cache-size", "64MiB", "--endpoint-url", "http://127.0.0.1:9",
                       "--s3-timeout", "2s"),
                   "S3 endpoint http://127.0.0.1:9 is unreachable (connection refused)")
    # no --endpoint-url: botocore's own endpoint (here from AWS_ENDPOINT_URL_S3) is named
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(tmp_path / "c"),
                       "--cache-size", "64MiB", "--s3-timeout", "2s",
                       env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}),
                   "the default AWS S3 endpoint (http://127.0.0.1:9) is unreachable "
                   "(connection refused)", code=1)
    # a web server that is no S3 endpoint (404 to everything)
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True)
    try:
        port = web.stdout.readline().split("port ")[1].split()[0]
        one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--cache-dir",
                           str(tmp_path / "c"), "--cache-size", "64MiB", "--endpoint-url",
                           f"http://127.0.0.1:{port}"), "is it an S3 endpoint?")
    finally:
        web.kill()
        web.wait()
        web.stdout.close()
    proxy.faults(status=400, code="InvalidArgument", message="bad", ops=["ListObjects"])
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), *cache),
                   f"S3 endpoint {proxy.url} answered 400 InvalidArgument: bad", code=1)
    proxy.faults(status=403, code="InvalidAccessKeyId", ops=["ListObjects"], count=1)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), *cache),
                   f"S3 refused the credentials for bucket '{bucket}' (InvalidAccessKeyId)")
    # good keys without the permission to list: not "refused the credentials"
    proxy.faults(status=403, code="AccessDenied", ops=["ListObjects"], count=1)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), *cache),
                   f"S3 denied listing bucket '{bucket}' (AccessDenied): cachefs needs "
                   "s3:ListBucket on it", code=1)
    proxy.reset()
    # (a path that cannot be a cache dir is bad input, exit 2: it was 1)
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(f / "sub"),
                       "--cache-size", "64MiB", "--endpoint-url", proxy.url),
                   f"cache dir {f / 'sub'}: a part of its path is not a directory", code=2)
    # a second daemon on the same cache dir, and a busy mountpoint
    m = mounts(f"s3://{bucket}")
    mp2 = tmp_path / "mp2"
    mp2.mkdir()
    one_line_error(cli("mount", f"s3://{bucket}", str(mp2), "--cache-dir", str(m.cache_dir),
                       "--cache-size", "64MiB", "--endpoint-url", proxy.url), "in use")
    one_line_error(cli("mount", f"s3://{bucket}", str(m.mp), "--cache-dir",
                       str(tmp_path / "c3"), "--cache-size", "64MiB", "--endpoint-url",
                       proxy.url), "busy")
    # a peer port another process holds: a failure a service restarts (exit 1; it was 2,
    # bad config, which the packaged unit does not restart), and nothing left mounted
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        one_line_error(cli("mount", f"s3://{bucket}", str(mp2), "--cache-dir",
                           str(tmp_path / "c4"), "--cache-size", "64MiB", "--endpoint-url",
                           proxy.url, "--node-id", "n0", "--peer-listen", f"127.0.0.1:{port}",
                           "--peers", f"n0=127.0.0.1:{port}",
                           env={"CACHEFS_PEER_SECRET": "cli-test-secret"}),
                       f"cannot listen for peers on 127.0.0.1:{port}: Address already in use",
                       code=1)
    assert not is_mounted(mp2)
    # inside a cachefs mount (a directory of the bucket)
    s3.put_object(Bucket=bucket, Key="inner/x", Body=b"x")
    assert (m.mp / "inner").is_dir()
    one_line_error(cli("mount", f"s3://{bucket}", str(m.mp / "inner"), "--cache-dir",
                       str(tmp_path / "c4"), "--cache-size", "64MiB", "--endpoint-url",
                       proxy.url), f"inside the cachefs mount at {m.mp}", code=2)
    assert not is_mounted(mp) and not is_mounted(mp2) and not is_mounted(m.mp / "inner")


@pytest.mark.fuse
def test_two_mounts_started_at_once_on_one_mountpoint(s3, bucket, proxy, tmp_path):
    """Both found the mountpoint free, and their mounts stacked: one must fail."""
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    mp = tmp_path / "mp"
    mp.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "cachefs", "mount", f"s3://{bucket}", str(mp), "--cache-dir",
         str(tmp_path / f"c{i}"), "--cache-size", "64MiB", "--endpoint-url", proxy.url],
        env={**os.environ, **CREDS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    try:
        assert sorted(code for code, _ in results) == [0, 1], results
        err = next(e for code, e in results if code)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"mountpoint {mp} is busy" in lines[0], err
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split()[4] == str(mp) for line in f) == 1
        assert (mp / "a.txt").read_bytes() == b"a"
    finally:
        r = cli("umount", str(mp))
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)


@pytest.mark.fuse
def test_a_mountpoint_after_a_double_dash(s3, bucket, proxy, tmp_path):
    """`cachefs mount ... -- s3://bucket -mp` (a mountpoint whose name starts with "-"):
    the start in the background added its --ready-fd after the "--", and the daemon took it
    for a third argument ("the daemon exited during start-up (status 2)")."""
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"after the dashes")
    mp = tmp_path / "-mp"
    mp.mkdir()
    r = cli("mount", "--cache-dir", str(tmp_path / "c"), "--cache-size", "1GiB",
            "--endpoint-url", proxy.url, "--", f"s3://{bucket}", "-mp", cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr
        assert (mp / "a.txt").read_bytes() == b"after the dashes"
    finally:
        assert cli("umount", "--", "-mp", cwd=tmp_path).returncode == 0
    assert not is_mounted(mp)


def test_a_foreground_mount_logs_to_the_log_file_it_is_given(s3, bucket, mounts, tmp_path):
    """--log-file (or [log] file) with --foreground, as under systemd: the file stayed empty
    and the log went to stderr."""
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"logged")
    logf = tmp_path / "fg.log"
    m = mounts(f"s3://{bucket}", extra=("--log-file", str(logf)))
    assert m.path("a.txt").read_bytes() == b"logged"
    text = logf.read_text()
    assert f" INFO cachefs.daemon: mounted s3://{bucket}/ at {m.mp}" in text, text
    assert "mounted" not in m.log_text()


def test_a_daemon_runs_this_cachefs_from_slash_and_shows_its_bucket(s3, bucket, proxy,
                                                                    tmp_path):
    """Mounted from a directory that holds a cachefs/ package (an old checkout): the daemon,
    started as `python -m cachefs`, ran that code instead; `status` then failed with
    "internal error: KeyError". The daemon also stayed in that directory, keeping its file
    system busy, and `mount`/`df` showed "cachefs" as the source (or the checkout's path)."""
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"ours")
    (tmp_path / "cachefs").mkdir()
    (tmp_path / "cachefs" / "__init__.py").write_text("")
    (tmp_path / "cachefs" / "__main__.py").write_text("print('not cachefs')\n")
    (tmp_path / "mp").mkdir()
    exe = Path(sys.executable).parent / "cachefs"  # the command users run
    assert exe.exists(), "cachefs is installed in the environment (scripts/setup.sh)"
    r = subprocess.run([str(exe), "mount", f"s3://{bucket}", "mp", "--cache-dir", "cache",
                        "--cache-size", "1GiB", "--endpoint-url", proxy.url], cwd=tmp_path,
                       env={**os.environ, **CREDS}, capture_output=True, text=True, timeout=60)
    mp = tmp_path / "mp"
    try:
        assert r.returncode == 0, r.stderr
        assert (mp / "a.txt").read_bytes() == b"ours"
        pid = int((tmp_path / "cache" / "lock").read_text())
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(mp))
        fstype, source = line.split(" - ")[1].split()[:2]
        assert (fstype, source) == ("fuse.cachefs", f"s3://{bucket}"), line
    finally:
        r = cli("umount", str(mp))
    assert r.returncode == 0, r.stderr


def test_daemonized_mount_and_umount(s3, bucket, proxy, tmp_path):
    s3.put_object(Bucket=bucket, Key="d/hello.txt", Body=b"hello")
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    r = cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(cache), "--cache-size",
            "2PiB", "--endpoint-url", proxy.url)
    try:
        assert r.returncode == 0, r.stderr
        # a cache larger than the disk is said at mount
        assert "--cache-size 2.0 PiB is larger than the free space" in r.stderr, r.stderr
        # the limit as read is said (a decimal "10GB" shows as 9.3 GiB)
        assert f"cachefs: mounted at {mp} (pid " in r.stderr and ", cache limit 2.0 PiB, log " \
            in r.stderr, r.stderr
        # returns only once the mount is live
        assert is_mounted(mp)
        # mounting again where it is mounted fails, and leaves the live mount alone
        again = cli("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(tmp_path / "c2"),
                    "--cache-size", "1GiB", "--endpoint-url", proxy.url)
        one_line_error(again, "is busy: another cachefs daemon")
        assert (mp / "d" / "hello.txt").read_bytes() == b"hello"
        # a second mount of the same cache dir is refused; the first daemon's log gets a
        # dated line about it, not the bare error line the refused process printed there
        mp2 = tmp_path / "mp2"
        mp2.mkdir()
        one_line_error(cli("mount", f"s3://{bucket}", str(mp2), "--cache-dir", str(cache),
                           "--cache-size", "1GiB", "--endpoint-url", proxy.url),
                       "in use by another cachefs daemon")
        logged = (cache / "cachefs.log").read_text()
        assert "cachefs: error:" not in logged, logged
        assert " ERROR cachefs: not started: cache dir " in logged, logged
        r = cli("stats", "--mount", str(mp), "--json")
        assert r.returncode == 0 and '"used_bytes"' in r.stdout
        # the daemon's argv and its logs never carry credentials
        info = cli("stats", "--mount", str(mp))
        assert "cache" in info.stdout
        pid = int((cache / "lock").read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        assert CREDS["AWS_SECRET_ACCESS_KEY"].encode() not in cmdline.replace(b"\0", b" ")
        # busy: a process inside the mount
        holder = subprocess.Popen(["sleep", "30"], cwd=mp)
        try:
            one_line_error(cli("umount", str(mp)), "busy")
        finally:
            holder.kill()
            holder.wait()
        r = cli("umount", str(mp))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mp)
        from cachefs.runtime import alive as _alive

        assert not _alive(pid)  # exited (a zombie not yet reaped by init counts as exited)
        # a mistyped prefix mounts (objects may come later), with a warning
        r = cli("mount", f"s3://{bucket}/dd", str(mp), "--cache-dir", str(cache),
                "--cache-size", "1GiB", "--endpoint-url", proxy.url)
        assert r.returncode == 0, r.stderr
        assert f"warning: s3://{bucket}/dd/ holds no object (yet)" in r.stderr
        assert cli("umount", str(mp)).returncode == 0
        # umount leaves alone what is not a cachefs mount
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True)
        try:
            one_line_error(cli("umount", str(mp)), "is not a cachefs mount", code=3)
            assert os.path.ismount(mp)
        finally:
            subprocess.run(["umount", str(mp)], check=True)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.mark.fuse
def test_umount_of_a_hung_or_dead_daemon(s3, bucket, mounts):
    """`cachefs umount` never touches the mount: a stopped daemon (SIGSTOP, its attributes
    expired, so any stat of the mountpoint would wait on it) is unmounted and named as
    still running; a killed daemon's mount (stale, a process still inside) is detached."""
    s3.put_object(Bucket=bucket, Key="d/f", Body=b"x")
    m = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    assert m.path("d/f").read_bytes() == b"x"
    pid = m.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the kernel's attributes of the root have expired
        one_line_error(cli("umount", "--timeout", "2", str(m.mp), timeout=30),
                       f"daemon pid {pid} is still running")
        assert not is_mounted(m.mp)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert m.proc.wait(timeout=30) == 0  # it saw the unmount and left cleanly

    m2 = mounts(f"s3://{bucket}")
    assert m2.path("d/f").read_bytes() == b"x"
    # (a program whose arguments name cachefs, as an editor of its config would)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                               "/etc/cachefs/train.toml"], cwd=m2.mp / "d")
    try:
        m2.proc.kill()
        m2.proc.wait()
        # its pid given to another program meanwhile: that is not the daemon (info.json
        # keeps the daemon's start time)
        import json

        from cachefs import runtime
        info = runtime.mount_dir(m2.mp) / "info.json"
        info.write_text(json.dumps({**json.loads(info.read_text()), "pid": holder.pid}))
        r = cli("umount", str(m2.mp), timeout=30)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m2.mp)
    finally:
        holder.kill()
        holder.wait()


def _short_dir(request) -> str:
    """An empty runtime dir of another shell (a short path: a control socket's path must
    fit in 107 bytes, which pytest's tmp_path may not leave room for)."""
    d = tempfile.mkdtemp(prefix="cfs-rt-", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return d

def test_a_mount_over_a_hung_mount_is_refused_and_does_not_hang(s3, bucket, mounts, proxy,
                                                                 request, tmp_path):
    """A mount at a mountpoint where a hung file system is mounted (its daemon stopped,
    and started from another shell: its lock is not this one's) asked that file system:
    `cachefs mount` hung in the kernel, unkillably, until the daemon went on. It is asked in
    a child now, which is given up after 2 s: a one-line "busy". A file system of another
    kind there is not asked at all."""
    m = mounts(f"s3://{bucket}")
    os.listdir(m.mp)
    args = ("mount", f"s3://{bucket}", str(m.mp), "--cache-dir", str(tmp_path / "c2"),
            "--cache-size", "64MiB", "--endpoint-url", proxy.url)
    env = {"CACHEFS_RUNTIME_DIR": _short_dir(request)}
    os.kill(m.proc.pid, signal.SIGSTOP)
    try:
        one_line_error(cli(*args, env=env, timeout=60),
                       f"mountpoint {m.mp} is busy: something is already mounted there")
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
    assert m.path("").is_dir()  # (still served)
    other = tmp_path / "t"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other)], check=True)
    try:
        one_line_error(cli(*args[:2], str(other), *args[3:], env=env, timeout=60),
                       f"mountpoint {other} is busy: a tmpfs file system is mounted there")
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_umount_from_a_shell_that_cannot_see_the_daemons_runtime_dir(s3, bucket, mounts,
                                                                     request):
    """A daemon started with another CACHEFS_RUNTIME_DIR (or XDG_RUNTIME_DIR, as under
    Slurm) is not found by `cachefs umount` from this shell. It took that for a dead daemon
    and detached the mount lazily, busy or not: the live daemon's readers lost it. Now
    the mount is asked (statfs): a live one is unmounted only when no process uses it, and
    only a dead one is detached."""
    s3.put_object(Bucket=bucket, Key="d/f", Body=b"x")
    env = {"CACHEFS_RUNTIME_DIR": _short_dir(request)}
    m = mounts(f"s3://{bucket}")
    assert m.path("d/f").read_bytes() == b"x"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              cwd=m.mp / "d")
    try:
        one_line_error(cli("umount", str(m.mp), env=env, timeout=30), "is busy")
        assert is_mounted(m.mp)
        assert m.path("d/f").read_bytes() == b"x"  # still served
    finally:
        holder.kill()
        holder.wait()
    r = cli("umount", str(m.mp), env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "exits on its own" in r.stderr
    assert not is_mounted(m.mp)
    assert m.proc.wait(timeout=30) == 0

    m2 = mounts(f"s3://{bucket}")
    assert m2.path("d/f").read_bytes() == b"x"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              cwd=m2.mp / "d")
    try:
        m2.proc.kill()
        m2.proc.wait()
        r = cli("umount", str(m2.mp), env=env, timeout=30)  # dead and busy: detached
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m2.mp)
    finally:
        holder.kill()
        holder.wait()

    # a hung daemon (stopped): the statfs that asks it is given up, and leaves nothing
    # inside the mount to keep it busy (a thread of umount's own did: "is busy")
    m3 = mounts(f"s3://{bucket}", extra=("--metadata-ttl", "1s"))
    assert m3.path("d/f").read_bytes() == b"x"
    os.kill(m3.proc.pid, signal.SIGSTOP)
    try:
        r = cli("umount", str(m3.mp), env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m3.mp)
    finally:
        os.kill(m3.proc.pid, signal.SIGCONT)
    assert m3.proc.wait(timeout=30) == 0


def _as_user(uid: int, fn) -> int:
    """fn() in a child of this process running as ``uid`` (forked, not executed: the
    interpreter may live where that user cannot read it); its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
            code = 0
        except BaseException as e:  # noqa: BLE001
            print(f"as uid {uid}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_why_a_command_finds_no_daemon(s3, bucket, mounts, request):
    """Every command said "no cachefs daemon is running for MP" whenever it found no control
    socket: for a directory inside the mount, for a mount served by root's daemon (the
    packaged unit's) when a user ran the command, for a daemon started with another
    runtime dir, and for a dead one. Each now says which it is."""
    from cachefs import runtime
    from cachefs.control import ControlClient
    from cachefs.errors import QuietError

    s3.put_object(Bucket=bucket, Key="d/f", Body=b"x")
    m = mounts(f"s3://{bucket}")
    assert m.path("d/f").read_bytes() == b"x"
    one_line_error(cli("stats", "--mount", str(m.mp / "d")),
                   f"inside the cachefs mount {m.mp}, not its mountpoint", code=2)
    env = {"CACHEFS_RUNTIME_DIR": _short_dir(request)}
    one_line_error(cli("stats", "--mount", str(m.mp), env=env),
                   "keeps its control socket where this shell does not look", code=3)
    if os.getuid() == 0:
        rd, wr = os.pipe()

        def as_nobody() -> None:
            os.environ.pop("CACHEFS_RUNTIME_DIR", None)
            os.environ.pop("XDG_RUNTIME_DIR", None)
            mp = runtime.find_mount(str(m.mp))
            try:
                ControlClient(runtime.socket_path(mp), mp).request({"op": "stats"})
            except QuietError as e:
                os.write(wr, str(e).encode())

        assert _as_user(65534, as_nobody) == 0
        os.close(wr)
        with os.fdopen(rd) as f:
            said = f.read()
        assert said == (f"{m.mp} is served by a cachefs daemon of user root, "
                                    "whose control socket only that user may use: run this "
                                    "command as root (sudo)")
    m.kill()
    one_line_error(cli("stats", "--mount", str(m.mp), env=env),
                   f"the cachefs daemon of {m.mp} is gone", code=3)


def test_a_users_daemon_is_found_from_a_shell_without_its_runtime_dir(monkeypatch):
    """A user's daemon keeps its control socket under $XDG_RUNTIME_DIR, or without one in
    /tmp/cachefs-<uid>. A command run from another shell (cron, Slurm, `sudo -u`, ssh
    without a login session: no XDG_RUNTIME_DIR, or another one) looked in its own place
    only, and said "no cachefs daemon is running" for a live mount. Commands now look in
    every place a daemon may use, a live daemon's dir before one a killed daemon left, and
    never in a directory of another user's."""
    from cachefs import runtime
    from cachefs.errors import QuietError

    if os.getuid() != 0:
        pytest.skip("needs root, to run as another user")
    uid = 65534  # nobody
    user_run = Path(f"/run/user/{uid}")
    tmp_root = Path(f"/tmp/cachefs-{uid}")
    mp = "/mnt/cachefs-test-mountpoint"
    marker = ".cachefs-test"  # in what this test makes: a killed run's are removed, not
    ours = {runtime.mount_dir(mp, resolved=True).name, marker}  # skipped for good
    if (user_run / marker).exists() or (
            not user_run.exists() and tmp_root.exists()
            and {p.name for p in tmp_root.iterdir()} <= ours):
        for d in (user_run, tmp_root):
            subprocess.run(["rm", "-rf", str(d)], check=False)
    if user_run.exists() or tmp_root.exists():
        pytest.skip(f"{user_run} or {tmp_root} exists already")
    # what a login session has (systemd-logind makes it)
    user_run.mkdir(mode=0o700, parents=True)
    (user_run / marker).touch()
    os.chown(user_run, uid, uid)
    # a second XDG_RUNTIME_DIR, holding a killed daemon's dir (where that user can reach it)
    other = Path(tempfile.mkdtemp(prefix="cachefs-test-xdg-"))
    os.chown(other, uid, uid)
    monkeypatch.delenv("CACHEFS_RUNTIME_DIR")

    def alive_here() -> None:
        runtime.write_info(Path(mp), {"pid": os.getpid(),
                                      "pid_start": runtime.proc_start(os.getpid())})

    def started_from_cron() -> None:
        os.environ.pop("XDG_RUNTIME_DIR", None)
        d = runtime.mount_dir(mp, create=True, resolved=True)
        assert d.parent == tmp_root, d  # not /run/user: gone at the last logout
        alive_here()
        os.environ["XDG_RUNTIME_DIR"] = str(user_run)  # a login shell
        assert runtime.socket_path(mp).parent == d
        assert runtime.read_info(mp)["pid"] == os.getpid()

    def started_in_a_session() -> None:
        os.environ["XDG_RUNTIME_DIR"] = str(user_run)
        live = runtime.mount_dir(mp, create=True, resolved=True)
        assert live.parent == user_run / "cachefs", live
        alive_here()
        # a killed daemon's dir for the same mountpoint, under another XDG_RUNTIME_DIR
        os.environ["XDG_RUNTIME_DIR"] = str(other)
        dead = runtime.mount_dir(mp, create=True, resolved=True)
        assert dead.parent == other / "cachefs", dead
        with open(dead / "info.json", "w") as f:
            f.write('{"pid": 999999999}')
        for xdg in (None, str(other)):  # cron: none; another session: the other one
            if xdg is None:
                os.environ.pop("XDG_RUNTIME_DIR", None)
            else:
                os.environ["XDG_RUNTIME_DIR"] = xdg
            assert runtime.socket_path(mp).parent == live, (xdg, runtime.socket_path(mp))
            assert runtime.read_info(mp)["pid"] == os.getpid()
        # /tmp/cachefs-<uid> made by someone else (root, here) is never looked in
        os.environ.pop("XDG_RUNTIME_DIR", None)
        os.rename(user_run / "cachefs", user_run / "moved")
        try:
            runtime.read_info(mp)
            raise AssertionError("another user's directory was used")
        except QuietError as e:
            assert str(e) == f"{tmp_root} is owned by another user; refusing to use it"
        os.rename(user_run / "moved", user_run / "cachefs")

    try:
        assert _as_user(uid, started_from_cron) == 0
        subprocess.run(["rm", "-rf", str(tmp_root)], check=True)
        # another user's, with a live pid, for the same mountpoint
        h = runtime.mount_dir(mp, resolved=True).name
        (tmp_root / h).mkdir(parents=True)
        (tmp_root / h / "info.json").write_text(f'{{"pid": {os.getpid()}}}')
        assert _as_user(uid, started_in_a_session) == 0
    finally:
        for d in (user_run, tmp_root, other):
            subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.mark.fuse
def test_runtime_dirs_are_removed(s3, bucket, mounts):
    """A mount's runtime dir (lock, control socket, info.json) is removed when its daemon
    exits; one a killed daemon left is removed by the next daemon to start, or by
    `cachefs umount` of its stale mount; a live daemon's is never touched.  They were
    never removed: one more for every mountpoint ever mounted."""
    from cachefs import runtime

    run = Path(os.environ["CACHEFS_RUNTIME_DIR"])

    def dirs() -> list[Path]:
        return sorted(run.iterdir())

    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    a = mounts(f"s3://{bucket}", name="a")
    da = runtime.mount_dir(a.mp)
    assert dirs() == [da] and (da / "control.sock").exists() and (da / "lock").exists()
    assert a.stop() == 0
    assert dirs() == []
    # killed: its dir stays until the next daemon starts, which leaves a live one's alone
    a.start()
    b = mounts(f"s3://{bucket}", name="b")
    db = runtime.mount_dir(b.mp)
    a.kill()
    assert dirs() == sorted([da, db])
    c = mounts(f"s3://{bucket}", name="c")
    dc = runtime.mount_dir(c.mp)
    assert dirs() == sorted([db, dc])
    assert b.path("f").read_bytes() == b"x" and b.control_ready()
    r = cli("umount", str(a.mp), timeout=30)  # its stale mount, without its info.json
    assert r.returncode == 0 and not is_mounted(a.mp), r.stderr
    # killed and mounted again at the same place: the same dir, removed at the stop
    b.kill()
    b.start()
    assert dirs() == sorted([db, dc]) and b.control_ready()
    assert b.stop() == 0 and c.stop() == 0
    assert dirs() == []
    # `cachefs umount` of a killed daemon's stale mount removes its dir
    c.start()
    c.kill()
    r = cli("umount", str(c.mp), timeout=30)
    assert r.returncode == 0 and not is_mounted(c.mp), r.stderr
    assert dirs() == []


@pytest.mark.parametrize("when", ["after its removal", "during its removal"])
def test_a_removed_lock_file_is_never_held(tmp_path, monkeypatch, when):
    """A daemon starting for a mountpoint whose previous daemon removes the runtime dir
    as it exits: it opened the old lock file, which is then unlinked.  It must not keep
    a lock on that file (a third daemon would lock the new one and both would serve),
    nor call the mountpoint busy: it takes the lock on a new file, in a dir made again."""
    import fcntl

    from cachefs import runtime

    d = tmp_path / "0123456789abcdef"

    def where() -> Path:
        d.mkdir(mode=0o700, exist_ok=True)
        return d / runtime.LOCK

    old = runtime.lock_file(where)  # the exiting daemon's
    (d / "info.json").write_text("{}")
    real_flock = fcntl.flock
    calls = []

    def flock(fd, op):  # runs between the new daemon's open and its lock
        if not calls:
            runtime.remove_mount_dir(d, old)
            if when == "after its removal":
                os.close(old)
        calls.append(fd)
        return real_flock(fd, op)

    monkeypatch.setattr(runtime.fcntl, "flock", flock)
    try:
        fd = runtime.lock_file(where)
    finally:
        if when == "during its removal":
            os.close(old)
    monkeypatch.setattr(runtime.fcntl, "flock", real_flock)
    assert len(calls) == 2  # the old file, then the new one
    st, fst = os.stat(d / runtime.LOCK), os.fstat(fd)
    assert (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino) and list(d.iterdir()) == [d / "lock"]
    with pytest.raises(runtime.LockBusy):  # and it is held
        runtime.lock_file(where)
    assert not runtime.remove_if_stale(d) and d.exists()  # a live holder's dir stays
    os.close(fd)
    assert runtime.remove_if_stale(d) and not d.exists()


def test_a_lock_held_for_a_moment_without_a_pid_is_waited_for(tmp_path):
    """Two daemons starting at once for two mountpoints: the second one's start removes
    the runtime dirs nobody holds, and so held the first one's lock for a moment (no pid
    in it) just as the first took it: the first failed with "is busy: another cachefs
    daemon is starting or serving there" (a cluster test that starts two nodes at once
    met it). A lock held with no pid is waited for, a second at most."""
    import fcntl
    import threading

    from cachefs import runtime

    d = tmp_path / "0123456789abcdef"
    d.mkdir(mode=0o700)

    def where() -> Path:
        d.mkdir(mode=0o700, exist_ok=True)
        return d / runtime.LOCK

    def lock_while_held(let_go) -> None:
        """lock_file while another holds the lock, which ``let_go(fd)`` ends 0.2 s on."""
        other = os.open(d / runtime.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(other, fcntl.LOCK_EX)
        t = threading.Timer(0.2, let_go, (other,))
        t.start()
        try:
            fd = runtime.lock_file(where)
        finally:
            t.join()
        os.close(fd)

    # the other start, checking whether it is stale: it was not, and lets go
    lock_while_held(os.close)
    # a killed daemon's lock file, with its pid, held by a start that removes it as stale:
    # that pid is no holder ("busy: another cachefs daemon (pid N)", N long dead)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (d / runtime.LOCK).write_text(f"{dead.pid}\n")

    def removed(fd: int) -> None:
        (d / runtime.LOCK).unlink()
        os.close(fd)

    lock_while_held(removed)


def _daemon_pid(cache) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            return int((cache / "lock").read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("the daemon never took the cache lock")


def _gone(pid: int, mp) -> bool:
    from cachefs.runtime import alive as _alive

    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid) and not is_mounted(mp)


def test_mount_that_gives_up_leaves_nothing_mounted(s3, bucket, proxy, tmp_path):
    """`cachefs mount` that stops waiting (its start-up deadline, or killed) leaves no
    daemon and no mount behind, though the daemon was about to mount."""
    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    mp = tmp_path / "mp"
    mp.mkdir()
    cache = tmp_path / "cache"
    args = ("mount", f"s3://{bucket}", str(mp), "--cache-dir", str(cache),
            "--cache-size", "1GiB", "--endpoint-url", proxy.url)
    try:
        # the bucket check at start-up answers after 10 s; the command waits 5 s (the
        # daemon's imports on a loaded host take seconds before it checks anything)
        proxy.faults(delay=10, ops=["ListObjects"])
        r = cli(*args, env={"CACHEFS_START_TIMEOUT": "5"})
        # (naming what it was doing: it said so, unseen, as it went)
        one_line_error(r, f"did not finish starting in 5s (it was checking s3://{bucket}/ at "
                          f"{proxy.url}) and was stopped")
        assert _gone(_daemon_pid(cache), mp)
        time.sleep(6)  # past the point where it would have mounted
        assert not is_mounted(mp)
        # killed while it waits: the daemon's "mounted" finds nobody, and it unmounts
        (cache / "lock").unlink()
        proxy.faults(delay=4, ops=["ListObjects"])
        p = subprocess.Popen([sys.executable, "-m", "cachefs", *args],
                             env={**os.environ, **CREDS}, stderr=subprocess.DEVNULL)
        pid = _daemon_pid(cache)
        p.kill()
        p.wait()
        assert _gone(pid, mp)
        assert "gave up waiting for it: unmounting" in (cache / "cachefs.log").read_text()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@pytest.mark.fuse
def test_umount_bounds_the_requests_left_waiting_on_s3(s3, bucket, proxy, mounts):
    """FUSE requests under way when the file system is unmounted (the kernel's read-ahead
    of a file closed since) waited for S3, 60 s here, and nothing told the daemon to stop:
    `cachefs umount` gave up on it ("still running (it hangs?)"). The daemon now gets a
    SIGTERM, and with it the stop's grace."""
    MiB = 1 << 20
    s3.put_object(Bucket=bucket, Key="r.bin", Body=random.randbytes(4 * MiB))
    m = mounts(f"s3://{bucket}", chunk_size="1MiB")
    m.path("r.bin").stat()
    proxy.faults(delay=60, count=-1)  # every GET: 60 s
    fd = os.open(m.path("r.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 4 * MiB, os.POSIX_FADV_WILLNEED)  # read-ahead, not waited
    finally:
        os.close(fd)
    wait_for(lambda: proxy.stats()["inflight"] >= 1, 10, "a GET under way")
    r = cli("umount", str(m.mp), "--timeout", "30")
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.mp)
    assert "FUSE requests still waiting 5 s after the stop began" in m.log_text()


@pytest.mark.fuse
def test_config_file_mount_table(s3, proxy, moto, tmp_path, mounts):
    for b in ("dc1-data", "dc2-data"):
        try:
            s3.create_bucket(Bucket=b)
        except Exception:
            pass
    s3.put_object(Bucket="dc1-data", Key="train/a.txt", Body=b"dc1")
    s3.put_object(Bucket="dc2-data", Key="b.txt", Body=b"dc2")
    cfg = tmp_path / "cachefs.toml"
    cfg.write_text(f"""
[s3]
endpoint_url = "{proxy.url}"

[[mount]]
name = "east"
source = "s3://dc1-data/train"

[[mount]]
name = "west"
source = "s3://dc2-data"
endpoint_url = "{moto.url}"
""")
    m = mounts("", config=str(cfg), endpoint="")
    assert sorted(os.listdir(m.mp)) == ["east", "west"]
    assert (m.mp / "east" / "a.txt").read_bytes() == b"dc1"
    assert (m.mp / "west" / "b.txt").read_bytes() == b"dc2"


def test_a_config_read_from_stdin_or_a_pipe_is_refused_before_the_daemon_starts(
        moto, tmp_path):
    """`--config /dev/stdin` or `--config <(...)`: the daemon, which reads the config again,
    found nothing there and failed, and the user saw only "the daemon exited during start-up
    (status 2)" (exit 1) and a cache dir left behind."""
    text = (f'[s3]\nendpoint_url = "{moto.url}"\n[cache]\ndir = "{tmp_path / "c"}"\n'
            'size = "64MiB"\n[[mount]]\nsource = "s3://b"\n')
    mp = tmp_path / "mp"
    mp.mkdir()
    one_line_error(cli("mount", "--config", "/dev/stdin", str(mp), input=text),
                   "config file /dev/stdin is read from a pipe or stdin", "--foreground",
                   code=2)
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    one_line_error(cli("mount", "--config", str(fifo), str(mp)),
                   f"config file {fifo} is read from a pipe", code=2)
    assert not (tmp_path / "c").exists() and not is_mounted(mp)
    r = cli("mount", "--config", "/dev/null", str(mp))  # read again as easily: not refused
    assert r.returncode != 0 and "pipe" not in r.stderr, r.stderr


def test_kernel_read_ahead_from_the_config_file(s3, bucket, tmp_path, mounts):
    """[read] kernel_read_ahead_kb sets the mount's kernel read-ahead (1024 by default)."""
    from cachefs.daemon import mount_device

    s3.put_object(Bucket=bucket, Key="f", Body=b"x" * 1000)

    def read_ahead_kb(m) -> int:
        dev = mount_device(m.mp)
        deadline = time.monotonic() + 10  # set once the kernel has finished FUSE INIT
        while True:
            kb = int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())
            if kb != 128 or time.monotonic() > deadline:
                return kb
            time.sleep(0.05)

    m = mounts(f"s3://{bucket}")
    assert m.path("f").read_bytes() == b"x" * 1000
    assert read_ahead_kb(m) == 1024
    m.stop()
    cfg = tmp_path / "cachefs.toml"
    cfg.write_text("[read]\nkernel_read_ahead_kb = 4096\n")
    m = mounts(f"s3://{bucket}", config=str(cfg))
    assert m.path("f").read_bytes() == b"x" * 1000
    assert read_ahead_kb(m) == 4096


def test_page_cache_can_be_bypassed(s3, bucket, tmp_path, mounts):
    """--no-page-cache (or [read] page_cache = false): every read reaches the daemon, none is
    served from the kernel page cache; MAP_SHARED mmap is refused, MAP_PRIVATE works."""
    import errno
    import mmap

    data = os.urandom(3 * 1024 * 1024 + 5)
    s3.put_object(Bucket=bucket, Key="f", Body=data)

    def read_twice(m) -> int:
        # (an fd held: a drop_caches=2 of a test running beside this one frees no inode in
        # use, nor its pages)
        with open(m.path("f"), "rb"):
            before = m.counters().get("fuse_read_bytes", 0)
            for _ in range(2):
                assert m.path("f").read_bytes() == data
            return m.counters().get("fuse_read_bytes", 0) - before

    m = mounts(f"s3://{bucket}")
    assert read_twice(m) == len(data)  # the second read came from the page cache
    m.stop()
    m = mounts(f"s3://{bucket}", extra=("--no-page-cache",))
    assert read_twice(m) == 2 * len(data)
    with open(m.path("f"), "rb") as f:
        with pytest.raises(OSError) as e:
            mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert e.value.errno == errno.ENODEV
        with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm:
            assert mm[:] == data
    m.stop()
    cfg = tmp_path / "cachefs.toml"
    cfg.write_text("[read]\npage_cache = false\n")
    m = mounts(f"s3://{bucket}", config=str(cfg))
    assert read_twice(m) == 2 * len(data)


def test_own_connections_can_be_turned_off(s3, bucket, proxy, tmp_path, mounts):
    """[s3] own_connections = false: ranged GETs still skip botocore's call path but go
    out through its HTTP session (httpx), not cachefs's connections."""
    objs = {f"f{i}.bin": os.urandom(3000 + i) for i in range(4)}
    for k, v in objs.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    bad = tmp_path / "bad.toml"
    bad.write_text('[s3]\nown_connections = "yes"\n')
    mp = tmp_path / "mp"
    mp.mkdir()
    one_line_error(cli("mount", f"s3://{bucket}", str(mp), "--config", str(bad),
                       "--cache-dir", str(tmp_path / "c"), "--cache-size", "64MiB"),
                   "own_connections", "expected true or false")
    cfg = tmp_path / "cachefs.toml"
    cfg.write_text("[s3]\nown_connections = false\n")
    m = mounts(f"s3://{bucket}", config=str(cfg), extra=("--prefetch-files", "0"))
    for k, v in objs.items():
        assert m.path(k).read_bytes() == v
    c = m.counters()
    assert c["s3_get_requests"] == 4 and c["s3_get_direct"] == 3, c
    assert "s3_connections" not in c, c


def test_version():
    r = subprocess.run([sys.executable, "-m", "cachefs", "--version"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "0.1.0" in r.stdout


@pytest.mark.fuse
def test_exit_codes_with_two_mounts(s3, bucket, mounts, tmp_path):
    """The README's exit codes hold across commands: 2 for input the user must fix (a
    path that does not exist, a directory, an offset past the end, several mounts and no
    --mount), 3 where no cachefs daemon serves the path."""
    s3.put_object(Bucket=bucket, Key="d/f.bin", Body=b"x" * 1000)
    a = mounts(f"s3://{bucket}", name="a")
    b = mounts(f"s3://{bucket}", name="b")
    one_line_error(cli("trace", str(a.path("d/missing.bin"))), "No such file", code=2)
    one_line_error(cli("trace", str(a.path("d"))), "not a regular file", code=2)
    one_line_error(cli("trace", str(a.path("d/f.bin")), "--offset", "1000"), "past the end",
                   code=2)
    one_line_error(cli("trace", str(a.path("d/f.bin")), "--length", "0"),
                   "--length: must be positive", code=2)
    outside = tmp_path / "plain.txt"
    outside.write_text("x")
    one_line_error(cli("trace", str(outside)), "not inside a cachefs mount", code=3)
    for cmd in (("stats",), ("trace", "--recent", "1")):
        one_line_error(cli(*cmd), "several cachefs mounts", str(a.mp), code=2)
    r = cli("stats", "--mount", str(a.mp), "--json")
    assert r.returncode == 0, r.stderr
    # a daemon killed outright leaves a stale mount, which is no choice: the live one is
    # meant (it was "several cachefs mounts" naming the dead one)
    b.kill()
    r = cli("stats")
    assert r.returncode == 0 and r.stdout.startswith(f"cachefs at {a.mp} "), r.stderr


def test_every_option_is_described():
    """`cachefs COMMAND --help` says what each option is for (demo's sizes said nothing)."""
    import click

    from cachefs.cli import cli as group

    bare = [(name, p.opts[0]) for name, cmd in group.commands.items() for p in cmd.params
            if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert bare == []
    r = cli("demo", "--help")
    assert r.returncode == 0 and "Size of each shard file." in r.stdout, r.stdout


@pytest.mark.fuse
def test_demo_with_one_shard_and_one_frame(tmp_path):
    """The demo runs end to end, and counts of one are singular. Its --workdir may be
    relative and deep: its runtime dir was put in it as given, and a relative one (or one
    too long for a socket's path) failed the mount."""
    deep = "d" * 80
    r = subprocess.run([sys.executable, "-m", "cachefs", "demo", "--workdir", deep,
                        "--shards", "1", "--shard-size", "64KiB", "--small-files", "1",
                        "--small-size", "1KiB"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"cachefs demo in {tmp_path / deep}" in r.stdout, r.stdout
    assert "data set: 1 shard of 64.0 KiB + 1 frame of 1.0 KiB = 65.0 KiB" in r.stdout, r.stdout
    assert "unmounted; cleaning up" in r.stdout
    (tmp_path / "w").mkdir()  # a --workdir that cannot be one: one line, exit 2 (it was a
    (tmp_path / "w" / "mnt").write_text("x")  # traceback)
    r = cli("demo", "--workdir", str(tmp_path / "w"), "--shards", "1")
    assert r.returncode == 2 and r.stderr == (
        f"cachefs: error: --workdir {tmp_path / 'w'}: cannot make {tmp_path / 'w' / 'mnt'} "
        "there: File exists\n"), r.stderr


@pytest.mark.slow
def test_setup_script_is_quiet_and_stops_when_pip_fails(tmp_path, request):
    """scripts/setup.sh in a copy of the repository, with a real venv and pip (about a
    minute: hence slow).  A good install prints its one line, not setuptools'
    "Editable installation" box (a grep dropped only its first line); a failing pip
    is shown and stops the script (its status was lost in that pipe, and an existing
    .venv then passed the import check: "setup: ready")."""
    import shutil

    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr.replace("not slow", "") and not os.environ.get("CACHEFS_RUN_SLOW"):
        pytest.skip("slow test: run with -m slow (or CACHEFS_RUN_SLOW=1)")
    src = Path(__file__).resolve().parent.parent
    repo = tmp_path / "repo"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", "build"))
    fake = tmp_path / "bin"  # the system packages are not what is tested here
    fake.mkdir()
    (fake / "dpkg").write_text("#!/bin/sh\nexit 0\n")
    (fake / "dpkg").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{fake}:{env['PATH']}"

    def setup() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=900)

    r = setup()
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "setup: ready (.venv/bin/cachefs)", r.stdout
    for box in ("!!", "****", "Please be careful", "Editable installation"):
        assert box not in r.stderr, r.stderr
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("dependencies = [", "dependencies = [[",
                                                       1))
    r = setup()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "setup: ready" not in r.stdout
    assert "setup: pip install -e '.[test]' failed (output above)" in r.stderr, r.stderr
    assert "TOMLDecodeError: Unclosed array" in r.stderr, r.stderr  # pip's own error


@pytest.mark.fuse
def test_another_source_over_the_same_cache_dir_lists_its_own_bucket(s3, bucket, proxy,
                                                                      mounts):
    """A listing kept in the index is reused after a restart only for what was listed:
    a cache dir mounted again, within the metadata TTL, with another bucket showed the
    first bucket's tree (whose files then failed with EIO)."""
    other = f"{bucket}-b"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=bucket, Key="d/a.bin", Body=b"A" * 1000)
    s3.put_object(Bucket=other, Key="d/b.bin", Body=b"B" * 500)
    s3.put_object(Bucket=other, Key="top.txt", Body=b"top")
    m = mounts(f"s3://{bucket}", name="same")
    assert sorted(os.listdir(m.mp)) == ["d"] and os.listdir(m.path("d")) == ["a.bin"]
    assert m.path("d/a.bin").read_bytes() == b"A" * 1000
    assert m.stop() == 0
    # the same source again: its listings come from the index, its bytes from the SSD
    proxy.reset()
    m = mounts(f"s3://{bucket}", name="same")
    assert m.path("d/a.bin").read_bytes() == b"A" * 1000
    assert m.counters()["dir_listings_from_index"] == 2
    assert proxy.stats()["ops"]["GetObject"] == 0
    assert m.stop() == 0
    # another bucket over the same cache dir: its own tree
    m = mounts(f"s3://{other}", name="same")
    assert sorted(os.listdir(m.mp)) == ["d", "top.txt"]
    assert os.listdir(m.path("d")) == ["b.bin"]
    assert m.path("d/b.bin").read_bytes() == b"B" * 500
    assert m.counters().get("dir_listings_from_index", 0) == 0


@pytest.mark.fuse
def test_a_mount_hides_nothing(s3, bucket, proxy, tmp_path):
    """A cache dir (or log) inside the mountpoint was hidden by the mount: every chunk
    write went into the mount itself and failed, nothing was ever cached.  A mountpoint
    that holds files hid them.  Both are bad input now, and nothing is left behind."""
    s3.put_object(Bucket=bucket, Key="f", Body=b"x" * 1000)
    mp = tmp_path / "mp"
    mp.mkdir()
    src = ("mount", f"s3://{bucket}", str(mp), "--cache-size", "64MiB", "--endpoint-url",
           proxy.url)
    try:
        for extra in ((), ("--foreground",)):
            one_line_error(cli(*src, "--cache-dir", str(mp / "cache"), *extra),
                           f"cache dir {mp / 'cache'} is inside the mountpoint {mp}", code=2)
        one_line_error(cli(*src, "--cache-dir", str(tmp_path / "c"), "--log-file",
                           str(mp / "x.log")), f"log file {mp / 'x.log'} is inside", code=2)
        assert os.listdir(mp) == [] and not is_mounted(mp)
        (mp / "precious.txt").write_text("keep")
        one_line_error(cli(*src, "--cache-dir", str(tmp_path / "c")),
                       f"mountpoint {mp} is not empty (it holds 'precious.txt')", code=2)
        assert not is_mounted(mp) and (mp / "precious.txt").read_text() == "keep"
        (mp / "precious.txt").unlink()
        r = cli(*src, "--cache-dir", str(tmp_path / "c"))
        assert r.returncode == 0, r.stderr
        assert (mp / "f").read_bytes() == b"x" * 1000
        assert cli("umount", str(mp)).returncode == 0
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def test_a_directory_of_the_users_is_never_taken_as_a_cache_dir(s3, bucket, proxy, tmp_path):
    """--cache-dir naming a directory that holds the user's files (an SSD's root, /var with
    its tmp/): start-up removed every file in its tmp/ and whatever in its chunks/ was not a
    chunk, and made it 0700, before it even found the bucket was a typo. Now it is refused
    on one line and left as it was; a cache dir cachefs made is tagged (CACHEDIR.TAG) and
    taken again, also one made before the tag."""
    s3.put_object(Bucket=bucket, Key="f", Body=b"x" * 1000)
    mp = tmp_path / "mp"
    mp.mkdir()
    shared = tmp_path / "scratch"
    (shared / "tmp").mkdir(parents=True)
    (shared / "tmp" / "results.csv").write_text("precious\n")
    shared.chmod(0o1777)
    src = ("mount", f"s3://{bucket}", str(mp), "--cache-size", "64MiB", "--endpoint-url",
           proxy.url)
    for extra in ((), ("--foreground",)):
        one_line_error(cli(*src, "--cache-dir", str(shared), *extra),
                       f"cache dir {shared} holds 'tmp/results.csv', which cachefs did not "
                       "put there", code=2)
    (shared / "tmp" / "results.csv").unlink()
    (shared / "chunks").mkdir()
    (shared / "chunks" / "README").write_text("notes\n")
    one_line_error(cli(*src, "--cache-dir", str(shared)), "holds 'chunks/README'", code=2)
    (shared / "notes.txt").write_text("mine\n")
    one_line_error(cli(*src, "--cache-dir", str(shared)), "holds 'notes.txt'", code=2)
    other = tmp_path / "ccache"  # another tool's cache, tagged with the same signature
    (other / "tmp").mkdir(parents=True)
    (other / "tmp" / "build.o.tmp").write_text("x")
    (other / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n"
                                        "# This file is a cache directory tag created by "
                                        "ccache.\n")
    one_line_error(cli(*src, "--cache-dir", str(other)), "holds 'CACHEDIR.TAG'", code=2)
    assert (other / "tmp" / "build.o.tmp").exists()
    assert sorted(p.name for p in shared.rglob("*")) == ["README", "chunks", "notes.txt", "tmp"]
    assert oct(shared.stat().st_mode & 0o7777) == "0o1777" and not is_mounted(mp)

    cache = tmp_path / "cache"
    try:
        assert cli(*src, "--cache-dir", str(cache)).returncode == 0
        assert (mp / "f").read_bytes() == b"x" * 1000
        assert cli("umount", str(mp)).returncode == 0
        tag = (cache / "CACHEDIR.TAG").read_bytes()
        assert tag.startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
        (cache / "CACHEDIR.TAG").unlink()  # as a cache made before the tag was
        r = cli(*src, "--cache-dir", str(cache))
        assert r.returncode == 0, r.stderr
        assert cli("umount", str(mp)).returncode == 0
        assert (cache / "CACHEDIR.TAG").read_bytes() == tag
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def test_a_bucket_that_does_not_exist_leaves_no_cache_dir_behind(s3, proxy, tmp_path):
    """A typo in a bucket's name: the daemon opened the index and made 256 chunk dirs and
    tmp/ in the new cache dir before it asked S3, and the failed `cachefs mount` left
    them. Buckets are now checked first, and the cache dir it made goes with it."""
    mp = tmp_path / "mp"
    mp.mkdir()
    fresh = tmp_path / "new" / "cache"
    for extra in ((), ("--foreground",)):
        r = cli("mount", "s3://no-such-bucket-here", str(mp), "--endpoint-url", proxy.url,
                "--cache-dir", str(fresh), "--cache-size", "64MiB", *extra, timeout=120)
        one_line_error(r, "does not exist", code=1)
        if not extra:
            assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))
        else:  # (--foreground cleans up nothing: systemd runs it again as it is)
            assert not (fresh / "index").exists() and not (fresh / "chunks").exists()
    # a cache dir that was there, empty (made for it, a volume's mountpoint), stays empty
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("mount", "s3://no-such-bucket-here", str(mp), "--endpoint-url", proxy.url,
            "--cache-dir", str(empty), "--cache-size", "64MiB", timeout=120)
    one_line_error(r, "does not exist", code=1)
    assert empty.is_dir() and not list(empty.iterdir()), list(empty.iterdir())
    assert not is_mounted(mp)

def test_a_failed_mount_leaves_a_cache_dir_another_daemon_locked(tmp_path):
    """Two mounts started at once on one empty cache dir: the one that lost removed the
    tag, lock and log of the one that won, and a third start could then take a new lock
    beside the winner's: two daemons on one cache dir."""
    import fcntl

    from cachefs.cli import _remove_fresh_cache_dir
    from cachefs.daemon import CACHEDIR_TAG

    d = tmp_path / "c"
    d.mkdir()
    for name in (CACHEDIR_TAG, "lock", "cachefs.log"):
        (d / name).write_text("x")
    fd = os.open(d / "lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the daemon that won
        _remove_fresh_cache_dir(d, None, d / "cachefs.log")
        assert sorted(os.listdir(d)) == sorted([CACHEDIR_TAG, "cachefs.log", "lock"])
    finally:
        os.close(fd)
    _remove_fresh_cache_dir(d, None, d / "cachefs.log")  # nobody holds it: all go
    assert d.is_dir() and os.listdir(d) == []


def test_a_mountpoint_in_the_cache_dir_or_a_log_on_a_read_only_disk_is_bad_input(tmp_path):
    """A mountpoint inside the cache dir passed the checks and was removed by start-up's
    clearing of tmp/ (or the cache dir was refused for holding it); a log file on a
    read-only file system exited 1, which systemd's Restart=on-failure retries for ever.
    Both are bad input now (exit 2), said before anything starts."""
    cache = tmp_path / "cache"
    (cache / "tmp" / "mnt").mkdir(parents=True)
    one_line_error(cli("mount", "s3://bucket-x", str(cache / "tmp" / "mnt"), "--cache-dir",
                       str(cache), "--cache-size", "64MiB"),
                   "is inside the cache dir", code=2)
    assert (cache / "tmp" / "mnt").is_dir()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs")
    try:
        mp = tmp_path / "mp"
        mp.mkdir()
        one_line_error(cli("mount", "s3://bucket-x", str(mp), "--cache-dir",
                           str(tmp_path / "c2"), "--cache-size", "64MiB", "--log-file",
                           str(ro / "cachefs.log")),
                       "cannot open log file", "Read-only file system", code=2)
        assert not (tmp_path / "c2").exists()
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)

def test_a_cache_dir_tag_cut_short_by_a_crash_is_cachefs_s(tmp_path):
    """A crash (power loss) as the first start wrote CACHEDIR.TAG left it empty or cut
    short, and every later start refused the cache dir: "holds 'CACHEDIR.TAG', which
    cachefs did not put there", pushing the user to throw the cache away. A tag cut short
    is cachefs's where nothing else in the dir is foreign, and the tag is now written to a
    file of its own, synced and renamed into place."""
    from cachefs.daemon import prepare_cache_dir
    from cachefs.errors import QuietError

    d = tmp_path / "cache"
    prepare_cache_dir(d)
    tag = d / "CACHEDIR.TAG"
    whole = tag.read_bytes()
    (d / "index").mkdir()
    (d / "index" / "data.mdb").write_bytes(b"x")
    for cut in (0, 10, len(whole) - 1):
        tag.write_bytes(whole[:cut])
        (d / "CACHEDIR.TAG.tmp").write_bytes(whole[:3])  # the crash before the rename
        prepare_cache_dir(d)
        assert tag.read_bytes() == whole
        assert not (d / "CACHEDIR.TAG.tmp").exists()
    # another tool's tag (the same signature line, then its own) is still not cachefs's,
    # nor a cut tag in a dir holding what cachefs did not put there
    other = tmp_path / "other"
    other.mkdir()
    (other / "CACHEDIR.TAG").write_bytes(whole[:43] + b"\n# made by ccache\n")
    with pytest.raises(QuietError, match="holds 'CACHEDIR.TAG'"):
        prepare_cache_dir(other)
    (other / "CACHEDIR.TAG").write_bytes(whole[:20])
    (other / "ccache.conf").write_text("x")
    with pytest.raises(QuietError, match="holds 'ccache.conf'"):
        prepare_cache_dir(other)

def test_a_foreground_daemon_tells_systemd_when_it_serves(s3, bucket, mounts, tmp_path):
    """The systemd unit was Type=simple: "active" as soon as the process was forked, so
    jobs ordered after it saw an empty directory, and `systemctl start` reported success
    for a mount that failed. `--foreground` under Type=notify says READY=1 once the mount
    serves, and STOPPING=1 when it goes; a failed start says why in STATUS."""
    import socket

    s3.put_object(Bucket=bucket, Key="d/f", Body=b"x" * 10)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = str(tmp_path / "notify")
    sock.bind(addr)
    sock.settimeout(30)
    try:
        m = mounts(f"s3://{bucket}", env={"NOTIFY_SOCKET": addr}, start=False)
        m.start()
        stages = []  # what start-up did, for `systemctl status` while it does it
        while (msg := sock.recv(4096).decode()).startswith("STATUS="):
            stages.append(msg)
        assert msg.startswith("READY=1\nSTATUS=serving "), msg
        assert stages[0].startswith(f"STATUS=checking s3://{bucket}/ at "), stages
        assert stages[-1] == f"STATUS=mounting at {m.mp}", stages
        assert os.listdir(m.path("d")) == ["f"]  # it serves
        assert m.stop() == 0
        assert sock.recv(4096).decode() == "STOPPING=1"
        # a start that fails: its reason, for `systemctl status`
        bad = mounts("s3://no-such-bucket-here", env={"NOTIFY_SOCKET": addr}, start=False,
                     name="bad")
        with pytest.raises(RuntimeError):
            bad.start()
        while (msg := sock.recv(4096).decode()).startswith("STATUS=checking"):
            pass
        assert msg.startswith("STATUS=") and "does not exist" in msg, msg
    finally:
        sock.close()


def test_packaged_deployments_run_what_the_cli_takes(monkeypatch, tmp_path):
    """The systemd unit and the Kubernetes DaemonSet: their cachefs command lines parse,
    their config files load, and the mountpoint exists before the mount starts (cachefs
    refuses a missing one: the DaemonSet never made it, and failed on every fresh node)."""
    import shlex

    import yaml

    from cachefs.cli import cli as group
    from cachefs.config import build_config
    pkg = Path(__file__).resolve().parent.parent / "packaging"
    monkeypatch.setenv("CACHEFS_PEER_SECRET", "s" * 32)

    def check_argv(argv: list[str]) -> dict:
        cmd = group.commands[argv[0]]
        with cmd.make_context("cachefs", argv[1:]) as ctx:
            return ctx.params

    unit = (pkg / "systemd" / "cachefs@.service").read_text()
    lines = {k: v.replace("%i", "train").replace("%H", "gpu-01") for k, _, v in
             (ln.partition("=") for ln in unit.splitlines() if not ln.startswith("#"))}
    argv = shlex.split(lines["ExecStart"])
    assert argv[0] == "/opt/cachefs/bin/cachefs"  # the venv packaging/README.md makes
    params = check_argv(argv[1:])
    assert "--foreground" in argv and lines["Type"] == "notify"  # READY=1: the daemon's
    stop = shlex.split(lines["ExecStop"])
    assert stop[0] == "-" + argv[0]  # (a busy or hand-unmounted mount is no failure)
    check_argv(stop[1:])
    mountpoint = params["args"][-1]
    pre = lines["ExecStartPre"]
    assert f"mkdir -p {mountpoint}" in pre, pre
    # run as it is, with the mountpoint moved here: it makes the directory, and succeeds
    # when the directory is there already
    unit_mp = tmp_path / "unit-mp"
    for _ in range(2):
        assert subprocess.run(shlex.split(pre.replace(mountpoint, str(unit_mp))),
                              capture_output=True).returncode == 0
        assert unit_mp.is_dir()
    assert params["config_file"] == "/etc/cachefs/train.toml"
    build_config(mountpoint=mountpoint, config_file=str(pkg / "systemd" /
                                                        "cachefs.toml.example"))

    docs = list(yaml.safe_load_all((pkg / "kubernetes" / "cachefs-daemonset.yaml").read_text()))
    spec = next(d for d in docs if d and d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    params = check_argv([a.replace("$(NODE_NAME)", "gpu-01") for a in c["args"]])
    check_argv(c["lifecycle"]["preStop"]["exec"]["command"][1:])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check_argv(c[probe]["exec"]["command"][1:])
    mountpoint = params["args"][-1]
    made = [i for i in spec.get("initContainers", ())
            if f"mkdir -p {mountpoint}" in " ".join(i["command"])]
    assert made, "nothing creates the DaemonSet's mountpoint before cachefs mounts it"
    # run as it is, with the mountpoint moved here: it makes the directory, and succeeds
    # when the directory is there already
    cmd = [a.replace(mountpoint, str(tmp_path / "mp")) for a in made[0]["command"]]
    for _ in range(2):
        assert subprocess.run(cmd, capture_output=True).returncode == 0
        assert (tmp_path / "mp").is_dir()
    vols = {v["name"]: v["mountPath"] for v in made[0]["volumeMounts"]}
    assert any(mountpoint.startswith(p + "/") for p in vols.values()), vols
    cm = next(d for d in docs if d and d["kind"] == "ConfigMap")
    (tmp_path / "cachefs.toml").write_text(cm["data"]["cachefs.toml"])
    build_config(mountpoint=mountpoint, config_file=str(tmp_path / "cachefs.toml"))


@pytest.mark.fuse
def test_pins_of_an_old_chunk_size_are_released(s3, bucket, proxy, tmp_path, mounts):
    """Chunk ids include the chunk size: after a restart with another one, the chunks
    pinned before could no longer be read, freed (`free` computes the new ids) or
    evicted, and held their space for ever.  They are unpinned, with a warning; a
    restart with the same chunk size keeps every pin."""
    data = {f"d/f{i}.bin": os.urandom(200_000) for i in range(3)}
    for k, v in data.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    lst = tmp_path / "list.txt"
    m = mounts(f"s3://{bucket}", name="cs", chunk_size="64KiB")
    lst.write_text(f"{m.path('d')}\n")
    r = cli("preload", "--file-list", str(lst), "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    pinned = m.stats()["cache"]["pinned_bytes"]
    on_disk = 3 * (3 * file_size(64 * 1024) + file_size(200_000 - 3 * 64 * 1024))
    assert pinned == on_disk  # the cache counts what its files take on disk
    assert m.stop() == 0
    m = mounts(f"s3://{bucket}", name="cs", chunk_size="64KiB")
    assert m.stats()["cache"]["pinned_bytes"] == pinned
    assert m.stop() == 0
    m = mounts(f"s3://{bucket}", name="cs", chunk_size="128KiB")
    assert m.stats()["cache"]["pinned_bytes"] == 0
    assert ("the chunk size changed from 64.0 KiB to 128.0 KiB: 12 pinned chunks (585.9 KiB)"
            in m.log_text())
    for k, v in data.items():
        assert m.path(k).read_bytes() == v
    r = cli("preload", "--file-list", str(lst), "--mount", str(m.mp), "--pin")
    assert r.returncode == 0, r.stderr
    assert m.stats()["cache"]["pinned_bytes"] == 3 * (file_size(128 * 1024) +
                                                      file_size(200_000 - 128 * 1024))
    r = cli("free", "--file-list", str(lst), "--mount", str(m.mp))
    assert r.returncode == 0, r.stderr
    assert m.stats()["cache"]["pinned_bytes"] == 0
    # nothing pinned: the change is said all the same (a whole cache read cold again)
    assert m.path("d/f0.bin").read_bytes() == data["d/f0.bin"]  # 2 chunks, unpinned
    assert m.stop() == 0
    m = mounts(f"s3://{bucket}", name="cs", chunk_size="64KiB")
    assert ("the chunk size changed from 128.0 KiB to 64.0 KiB: what was cached under the "
            "old size can no longer be read" in m.log_text()), m.log_text()
    assert m.path("d/f0.bin").read_bytes() == data["d/f0.bin"]


def test_stats_text_says_what_each_miss_figure_counts():
    """The misses line printed the chunk count and the GET count side by side with
    nothing to tell them apart ("S3 70 GETs 70 (83.6 MiB)")."""
    from cachefs.report import format_stats

    cache = {"used_bytes": 0, "limit_bytes": 1, "chunks": 0, "pinned_bytes": 0,
             "pinned_chunks": 0}
    c = {"s3_misses": 70, "s3_get_requests": 71, "s3_bytes": 87_660_000, "s3_retries": 1}
    s = {"counters": c, "cache": cache, "uptime_s": 1, "open_files": 0, "in_flight_fetches": 0}
    lines = format_stats("/mnt/x", s).splitlines()
    assert "  misses     70 chunks from S3 (83.6 MiB) in 71 GETs, 1 retry, 0 errors" in lines, \
        lines


def test_what_makes_a_fuse_mount_fail_is_said_in_words(tmp_path):
    """libfuse says only "fuse_session_mount failed" and writes its reason to stderr, which a
    daemon sends to its log: `cachefs mount` printed that line alone. The usual causes are
    named in the error line now."""
    from cachefs.daemon import fuse_mount_problem

    dev, conf, bindir = tmp_path / "fuse", tmp_path / "fuse.conf", tmp_path / "bin"
    bindir.mkdir()

    def problem(allow_other: bool, uid: int) -> str | None:
        return fuse_mount_problem(allow_other, uid, str(dev), str(conf), str(bindir))

    assert problem(False, 0).startswith(f"there is no {dev}: load the fuse module")
    dev.touch()
    assert problem(True, 0) is None  # root needs neither fusermount3 nor fuse.conf
    assert problem(False, 1000).startswith("fusermount3 is not installed")
    fusermount = bindir / "fusermount3"
    fusermount.write_text("#!/bin/sh\n")
    fusermount.chmod(0o755)
    assert problem(False, 1000) is None
    for text in (None, "# user_allow_other\n", "mount_max = 1000\n"):
        if text is not None:
            conf.write_text(text)
        assert problem(True, 1000) == \
            f"--allow-other needs user_allow_other in {conf} when a user other than root mounts"
    conf.write_text("mount_max = 1000\n user_allow_other  # for cachefs\n")
    assert problem(True, 1000) is None


def test_legacy_bucket_names_with_upper_case_are_taken():
    """Buckets made before S3's naming rules (us-east-1) and those of S3-compatible stores
    may have upper-case letters: `invalid bucket name` refused them, while '_' passed."""
    from cachefs.config import parse_source
    from cachefs.errors import ConfigError

    assert parse_source("s3://Legacy_Bucket/train/") == ("Legacy_Bucket", "train/")
    for bad in ("s3://-x", "s3://a", "s3://a b", "s3://a/../b"):
        with pytest.raises(ConfigError):
            parse_source(bad)
    # a prefix that starts with '/' (it named the prefix without it)
    with pytest.raises(ConfigError, match="starts with '/'"):
        parse_source("s3://bkt//data")
    assert parse_source("s3://bkt/data//") == ("bkt", "data/")


def test_a_signal_while_the_daemon_starts_stops_it_and_undoes_the_start(tmp_path):
    """A SIGTERM (systemctl stop, the waiting command's Ctrl-C) while the daemon started
    killed it outright: its runtime dir and lock stayed, and after the FUSE mount a stale
    mount. The start now stops where it is, undoes what it made and says so; a SIGTERM
    of the waiting `cachefs mount` stops its daemon too (it went on starting)."""
    import socket

    from cachefs import runtime

    silent = socket.socket()  # an S3 endpoint that takes connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    mp = tmp_path / "mp"
    mp.mkdir()
    args = [sys.executable, "-m", "cachefs", "mount", "s3://bucket-x", str(mp),
            "--endpoint-url", url, "--cache-dir", str(tmp_path / "c"), "--cache-size",
            "64MiB", "--s3-timeout", "60s"]
    env = {**os.environ, **CREDS}
    silent.settimeout(60)
    taken = []  # the daemons' connections to the silent endpoint: open till the end
    p = None
    try:
        p = subprocess.Popen([*args, "--foreground"], env=env, stderr=subprocess.PIPE,
                             text=True)
        taken.append(silent.accept()[0])  # the bucket check is under way (a fixed sleep
        time.sleep(0.5)  # was too short for a daemon still importing on a loaded host)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 130, (p.returncode, err)
        assert err.strip().splitlines()[-1] == ("cachefs: error: stopped by SIGTERM while "
                                                "starting"), err
        assert not runtime.mount_dir(mp).exists() and not is_mounted(mp)
        # the waiting command's SIGTERM: its daemon stops too, and nothing stays
        p = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
        taken.append(silent.accept()[0])
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "interrupted" in err, (p.returncode, err)
        assert not runtime.mount_dir(mp).exists() and not is_mounted(mp)
        r = subprocess.run(["pgrep", "-f", str(mp)], capture_output=True, text=True)
        assert r.stdout.strip() == "", r.stdout
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        for c in taken:
            c.close()
        silent.close()


def test_a_failed_mount_never_takes_down_another_daemons_mount(s3, bucket, mounts, request,
                                                                monkeypatch):
    """Two `cachefs mount` of one mountpoint at once from shells with different runtime
    dirs: the one that failed ("already mounted there") unmounted the mountpoint after its
    daemon's error, taking down the other daemon's live mount. A daemon that exited by
    itself has removed its own mount: nothing is unmounted after it."""
    from cachefs import cli as cli_mod

    s3.put_object(Bucket=bucket, Key="f", Body=b"x")
    m = mounts(f"s3://{bucket}")
    assert m.path("f").read_bytes() == b"x"
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failed.wait()
    ours = os.environ["CACHEFS_RUNTIME_DIR"]
    monkeypatch.setenv("CACHEFS_RUNTIME_DIR", _short_dir(request))  # m's info is not seen
    cli_mod._stop_starting_daemon(failed, str(m.mp), mounted_before=False)
    monkeypatch.setenv("CACHEFS_RUNTIME_DIR", ours)
    assert is_mounted(m.mp) and m.path("f").read_bytes() == b"x"


def test_a_secret_in_a_config_file_others_may_read_is_warned_of(mounts, bucket, tmp_path):
    """`[cluster] peer_secret` in a config file of mode 0644: any user of the node (a
    training job) could read the secret that lets one serve chunks to the cluster. The
    daemon says so at start-up (it does not refuse: an upgrade must not stop a node)."""
    from etcd_env import free_port

    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[cluster]\nnode_id = 'n0'\npeer_listen = '127.0.0.1:{port}'\n"
                   f"peers = ['n0=127.0.0.1:{port}']\npeer_secret = 'config-file-secret'\n")
    cfg.chmod(0o644)
    m = mounts(f"s3://{bucket}", config=str(cfg), env={"CACHEFS_PEER_SECRET": ""})
    log = m.log_text()
    assert (f"config file {cfg} holds [cluster] peer_secret and other users may read it "
            "(mode 0644): chmod 600 it") in log, log
    assert "config-file-secret" not in log
    assert m.stop() == 0
    cfg.chmod(0o600)
    m = mounts(f"s3://{bucket}", config=str(cfg), env={"CACHEFS_PEER_SECRET": ""})
    assert "chmod 600" not in m.log_text()


def test_the_environment_names_the_collector_before_the_config_file(tmp_path, monkeypatch):
    """CACHEFS_OTLP_ENDPOINT lost to `[trace] otlp_endpoint`, unlike every other CACHEFS_
    variable: a DaemonSet's URL with a token, from a Secret, was silently not used."""
    from cachefs.config import build_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[cache]\nsize = '1GiB'\ndir = '{tmp_path / 'c'}'\n"
                   "[trace]\notlp_endpoint = 'http://file-collector:4318'\n")
    monkeypatch.setenv("CACHEFS_OTLP_ENDPOINT", "http://env-collector:4318")
    c = build_config(mountpoint=str(tmp_path / "mp"), source="s3://bucket-x",
                     config_file=str(cfg), flags={})
    assert c.otlp_endpoint == "http://env-collector:4318"
    c = build_config(mountpoint=str(tmp_path / "mp"), source="s3://bucket-x",
                     config_file=str(cfg), flags={"otlp_endpoint": "http://flag:4318"})
    assert c.otlp_endpoint == "http://flag:4318"
    monkeypatch.delenv("CACHEFS_OTLP_ENDPOINT")
    c = build_config(mountpoint=str(tmp_path / "mp"), source="s3://bucket-x",
                     config_file=str(cfg), flags={})
    assert c.otlp_endpoint == "http://file-collector:4318"
