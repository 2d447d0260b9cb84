"""Configuration: frozen dataclasses loaded from a TOML file, overridden by flags.

All validation happens here, with messages a user can act on.  Credentials are
never part of the configuration: they come from the standard AWS chain
(environment, shared credentials file, profile).  The peer secret may come from
the file or from ``CACHEFS_PEER_SECRET``.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# 8 MiB: S3 guidance for ranged GETs is 8-16 MB per request, which amortises
# the ~ms time-to-first-byte; 500 GiB of cache is then only 64k chunk records.
# Objects smaller than a chunk occupy only their own size.
DEFAULT_CHUNK_SIZE = 8 * MiB
# Training data is immutable in practice; 5 minutes bounds how long an
# overwrite stays invisible while keeping LIST traffic negligible.
DEFAULT_METADATA_TTL = 300.0
DEFAULT_NEGATIVE_TTL = 10.0  # a missing name's lookup lists its directory again after this
DEFAULT_READAHEAD_MEMORY = 256 * MiB
DEFAULT_READAHEAD_CHUNKS = 8
DEFAULT_PREFETCH_FILES = 32
MAX_KERNEL_READ_AHEAD_KB = 65536  # the kernel read-ahead of the mount (bdi read_ahead_kb)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": 1024 * GiB, "tb": 1000**4, "tib": 1024 * GiB,
    "p": 1024**5, "pb": 1000**5, "pib": 1024**5,
    "e": 1024**6, "eb": 1000**6, "eib": 1024**6,
}


def parse_count(value: Any, what: str) -> int:
    """A whole number >= 0 from a flag or a TOML value."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{what}: expected a whole number, got {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{what}: expected a whole number, got {value!r}") from None
    if n < 0:
        raise ConfigError(f"{what}: must be >= 0, got {value!r}")
    return n


def _readable_file(value: Any, what: str) -> str | None:
    """An absolute path to a file this process can read (the daemon changes directory)."""
    if value is None:
        return None
    p = Path(str(value)).expanduser()
    if not p.is_file() or not os.access(p, os.R_OK):
        raise ConfigError(f"{what}: cannot read {str(value)!r}")
    return str(p.resolve())


def parse_str(value: Any, what: str, secret: bool = False) -> str | None:
    """A text setting (a name, a region, a secret): a TOML number or list is refused,
    and a secret's value is never repeated in the error (it goes to the journal)."""
    if value is not None and not isinstance(value, str):
        got = f"a TOML {type(value).__name__} (write it in quotes)" if secret else repr(value)
        raise ConfigError(f"{what}: expected a string, got {got}")
    return value


def parse_path(value: Any, what: str) -> Path | None:
    """A path setting; ``~`` is the user's home, as in a shell."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a path (a string), got {value!r}")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # ~name of a user this machine does not know
        raise ConfigError(f"{what}: {value!r}: no such user's home directory") from None


def parse_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what}: expected true or false, got {value!r}")
    return value


def parse_size(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like 500GiB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m or m.group(2) is None and not m.group(1):
            raise ConfigError(f"{what}: expected a size like 500GiB or 8MiB, got {value!r}")
        unit = (m.group(2) or "").lower()
        if unit not in _UNITS:
            raise ConfigError(f"{what}: unknown unit in {value!r} (use KiB, MiB, GiB, TiB)")
        # exact (a float rounds 20 digits), whole bytes: 0.3GiB is 322122547 of them
        try:
            exact = Fraction(m.group(1)) * _UNITS[unit]
        except ValueError:  # more digits than Python turns into a number (4,300)
            raise ConfigError(f"{what}: {str(value)[:40]!r}… is too large") from None
        if exact.denominator != 1 and _UNITS[unit] == 1:
            raise ConfigError(f"{what}: {value!r} is not a whole number of bytes")
        n = math.floor(exact)
    if n >= 1 << 64:
        raise ConfigError(f"{what}: {str(value)[:40]!r}{'…' if len(str(value)) > 40 else ''} "
                          "is too large")
    if n <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return n


def parse_positive_duration(value: Any, what: str) -> float:
    secs = parse_duration(value, what)
    if secs <= 0:
        raise ConfigError(f"{what}: must be more than 0, got {value!r}")
    return secs


def check_endpoint(url: str | None, what: str) -> str | None:
    """An endpoint URL: http(s)://host[:port][/path].  ``what`` names the setting (the
    flag, the table and key, the environment variable): the error never repeats the URL,
    which may carry a secret (under systemd, errors go to the journal)."""
    if url is None:
        return None
    try:
        u = urlsplit(str(url))
        u.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:  # also an unclosed [IPv6 address
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"{what}: expected http://host:port or https://host")
    return str(url)


# a region is a host label (botocore's rule): it goes into the endpoint's host name
_REGION_RE = re.compile(r"(?![0-9]+$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_region(value: Any, what: str) -> str | None:
    """A region name; one botocore would refuse failed the mount after it had started,
    as "invalid S3 endpoint None" (exit 1: a service restarted it for ever)."""
    value = parse_str(value, what)
    if value is None:
        return None
    if not _REGION_RE.fullmatch(value):
        raise ConfigError(f"{what}: {value!r} is not a region name (letters, digits and "
                          "'-', as in us-east-1)" if value else
                          f"{what} is empty: leave it out for the default")
    return value


_AWS_CHAIN = "they come from the AWS chain (environment, profile, instance role)"


def _no_credentials(url: Any, where: str, what: str = "an S3 endpoint URL",
                    instead: str = _AWS_CHAIN) -> None:
    """S3 credentials come from the AWS chain, etcd's from --etcd-user and the
    environment: an endpoint URL with user:password@ would carry them into the process
    list, the log and error messages (so the error names the setting, never the URL)."""
    # user[:password]@ with or without a scheme ("AKIA...:SECRET@s3.internal:9000"); a
    # password may hold '/', '?' or '#', and no endpoint has an '@' of its own: any '@'
    if url is not None and "@" in str(url):
        raise ConfigError(f"{where}: {what} must not carry credentials "
                          f"(user:password@); {instead}")


MAX_DURATION = 10 * 365 * 24 * 3600
MAX_ATTEMPTS = 100  # S3 attempts per request: the retry budget is summed over them at start


def parse_duration(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a duration like 300s, got {value!r}")
    if isinstance(value, int | float):
        secs = float(value)
    else:
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", str(value))
        if not m:
            raise ConfigError(f"{what}: expected a duration like 300s, 50ms or 5m, got {value!r}")
        secs = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if not math.isfinite(secs):
        raise ConfigError(f"{what}: expected a duration like 300s, got {value!r}")
    if secs < 0:
        raise ConfigError(f"{what}: must not be negative")
    if secs > MAX_DURATION:  # (socket time-outs overflow C's time types past ~1e11 s)
        raise ConfigError(f"{what}: must be at most {MAX_DURATION // 3600}h (ten years), "
                          f"got {value!r}")
    return secs


def parse_fraction(value: Any, what: str) -> float:
    """A fraction in (0, 1]: 0.9, "0.9" or "90%"."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str) and value.strip().endswith("%"):
            f = float(value.strip()[:-1]) / 100
        else:
            f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a fraction such as 0.9 or 90%, got {value!r}"
                          ) from None
    return f


def parse_hostport(value: Any, what: str) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected \"HOST:PORT\" (a string), got {value!r}")
    host, sep, port = value.rpartition(":")
    if (not sep or not (port.isascii() and port.isdigit()) or not (0 <= int(port) < 65536)
            or any(c.isspace() or not c.isprintable() for c in host)):
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


ADVERTISE_ENV = "CACHEFS_PEER_ADVERTISE"  # wins over --peer-advertise and [cluster] advertise
_WILDCARD_HOSTS = ("0.0.0.0", "::")


def parse_advertise(value: Any, what: str) -> str:
    """The HOST:PORT other nodes connect to: a host they can reach (not empty, not a
    wildcard such as 0.0.0.0) and a port from 1 to 65535."""
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected \"HOST:PORT\" (a string), got {value!r}")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536
            or not host or host in _WILDCARD_HOSTS
            or any(c.isspace() or not c.isprintable() for c in host)):
        raise ConfigError(f"{what}: expected HOST:PORT that other nodes can connect to "
                          f"(a host name or address, and a port from 1 to 65535), "
                          f"got {value!r}")
    return value


# (upper case and '_': legacy us-east-1 buckets, and S3-compatible stores, have them)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{1,254}$")


def parse_source(source: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix) with prefix '' or ending in '/'."""
    if not source.startswith("s3://"):
        raise ConfigError(f"source must look like s3://bucket[/prefix], got {source!r}")
    rest = source[5:]
    if "@" in rest.split("/", 1)[0] or re.match(r"[^@/]*:[^@]*@", rest):
        # s3://KEY:SECRET@bucket (a secret may hold a "/"): never repeated, never used
        raise ConfigError("the source s3://… must not carry credentials (USER:SECRET@): "
                          "give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile "
                          "(--profile) or the instance's role")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"invalid bucket name in {source!r}")
    if prefix.startswith("/"):
        # (s3://b//data named data/ before: keys that start with '/' cannot be mounted)
        raise ConfigError(f"invalid prefix in {source!r}: it starts with '/' (an empty "
                          "path segment)")
    prefix = prefix.rstrip("/")
    if prefix:
        if any(p in ("", ".", "..") for p in prefix.split("/")):
            raise ConfigError(f"invalid prefix in {source!r}: '', '.' and '..' are no "
                              "directory names")
        prefix += "/"
    return bucket, prefix


@dataclass(frozen=True)
class MountSpec:
    """One bucket (or bucket/prefix) and the endpoint that serves it."""

    name: str  # top-level directory name; "" when it is the mount root
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class S3Options:
    max_attempts: int = 6  # attempts per request, including the first
    request_timeout: float = 30.0  # one attempt, first byte to last byte
    connect_timeout: float = 5.0
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    max_concurrency: int = 32  # concurrent S3 requests per endpoint
    own_connections: bool = True  # ranged GETs on cachefs's HTTP/1.1 connections (http1.py)


@dataclass(frozen=True)
class ClusterOptions:
    node_id: str | None = None
    peer_listen: str | None = None  # HOST:PORT
    advertise: str | None = None  # HOST:PORT peers connect to (default: listen, or hostname:port)
    peers: tuple[str, ...] = ()  # static members "host:port" or "node=host:port"
    etcd: tuple[str, ...] = ()
    etcd_prefix: str = "/cachefs/members/"
    etcd_ca: str | None = None  # CA file that signed etcd's certificate (default: the system's)
    etcd_cert: str | None = None  # client certificate, for etcd's --client-cert-auth
    etcd_key: str | None = None  # its private key
    etcd_user: str | None = None  # etcd's --auth: user name (password from the environment)
    etcd_password: str | None = field(default=None, repr=False)
    peer_secret: str | None = field(default=None, repr=False)
    peer_timeout: float = 2.0
    lease_ttl: int = 10
    grace_period: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.peer_listen)


@dataclass(frozen=True)
class Config:
    mounts: tuple[MountSpec, ...]
    mountpoint: Path
    cache_dir: Path
    cache_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    metadata_ttl: float = DEFAULT_METADATA_TTL
    attr_timeout: float = DEFAULT_METADATA_TTL
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    readahead_memory: int = DEFAULT_READAHEAD_MEMORY
    readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS
    prefetch_files: int = DEFAULT_PREFETCH_FILES
    kernel_read_ahead_kb: int = 1024
    page_cache: bool = True  # False: reads bypass the kernel page cache (FOPEN_DIRECT_IO)
    allow_other: bool = False
    foreground: bool = False
    log_level: str = "INFO"
    log_file: Path | None = None
    s3: S3Options = S3Options()
    cluster: ClusterOptions = ClusterOptions()
    slow_threshold: float = 0.05
    metrics_listen: str | None = None
    otlp_endpoint: str | None = field(default=None, repr=False)
    config_file: Path | None = None
    warnings: tuple[str, ...] = ()  # said at start-up, as the daemon's own warnings

    @property
    def single_root(self) -> bool:
        return len(self.mounts) == 1 and self.mounts[0].name == ""


def _table(d: dict, key: str) -> dict:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(f"config: [{key}] must be a table")
    return v


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"config: unknown key(s) in {where}: {', '.join(sorted(unknown))}")


def load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file not readable: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


_NAME_RE = re.compile(r"[^/\x00-\x1f\x7f]{1,255}")  # a directory name, printable (fullmatch)


def build_config(
    *,
    mountpoint: str,
    source: str | None = None,
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Merge the TOML file (if any) and flags (which win) into a validated Config."""
    if not mountpoint:  # ("$MNT" unset): it would be the current directory
        raise ConfigError("MOUNTPOINT is empty")
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    raw: dict = load_toml(Path(config_file)) if config_file else {}
    _check_keys(raw, {"cache", "metadata", "read", "s3", "mount", "cluster", "trace", "log",
                      "fuse"}, "top level")
    cache = _table(raw, "cache")
    _check_keys(cache, {"dir", "size", "chunk_size", "high_watermark", "low_watermark"}, "[cache]")
    meta = _table(raw, "metadata")
    _check_keys(meta, {"ttl", "attr_timeout", "negative_ttl"}, "[metadata]")
    read = _table(raw, "read")
    _check_keys(read, {"readahead_memory", "readahead_chunks", "prefetch_files",
                       "kernel_read_ahead_kb", "page_cache"}, "[read]")
    s3 = _table(raw, "s3")
    _check_keys(s3, {"endpoint_url", "region", "profile", "max_attempts", "request_timeout",
                     "connect_timeout", "max_concurrency", "own_connections"}, "[s3]")
    cl = _table(raw, "cluster")
    _check_keys(cl, {"node_id", "peer_listen", "advertise", "peers", "etcd", "etcd_prefix",
                      "etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password",
                     "peer_secret", "peer_timeout", "lease_ttl", "grace_period"}, "[cluster]")
    tr = _table(raw, "trace")
    _check_keys(tr, {"slow_threshold", "metrics_listen", "otlp_endpoint"}, "[trace]")
    lg = _table(raw, "log")
    _check_keys(lg, {"level", "file"}, "[log]")
    fu = _table(raw, "fuse")
    _check_keys(fu, {"allow_other"}, "[fuse]")

    def pick(flag: str, table: dict, key: str, default: Any = None) -> Any:
        if flag in flags:
            return flags[flag]
        return table.get(key, default)

    def where(flag: str, key: str) -> str:
        """What an error names for a value ``pick`` took: the flag, or the file's key."""
        return "--" + flag.replace("_", "-") if flag in flags else key

    base = Path(config_file).resolve().parent if config_file else None

    def pick_path(flag: str, table: dict, key: str, what: str) -> Path | None:
        """A relative path in the file is taken from the file's directory (a service
        started in / finds what the file names); on the command line, from the current
        directory."""
        p = parse_path(pick(flag, table, key), what)
        if p is not None and flag not in flags and base is not None and not p.is_absolute():
            p = base / p
        return p.absolute() if p is not None else None  # the daemon changes directory to /

    _no_credentials(flags.get("endpoint_url"), "--endpoint-url")
    _no_credentials(s3.get("endpoint_url"), "[s3] endpoint_url")
    endpoint = check_endpoint(pick("endpoint_url", s3, "endpoint_url"),
                              where("endpoint_url", "[s3] endpoint_url"))
    region = check_region(pick("region", s3, "region"), where("region", "[s3] region"))
    profile = parse_str(pick("profile", s3, "profile"), "[s3] profile")

    mounts: list[MountSpec] = []
    if source and "mount" in raw:
        raise ConfigError(f"{source} on the command line and the [[mount]] tables of "
                          f"{config_file} cannot be combined: give one or the other")
    if source:
        bucket, prefix = parse_source(source)
        mounts.append(MountSpec("", bucket, prefix, endpoint, region, profile))
    else:
        entries = raw.get("mount", [])
        if "mount" in raw and not isinstance(entries, list):  # [mount], or mount = "s3://…"
            got = "a [mount] table" if isinstance(entries, dict) else "a value"
            raise ConfigError("config: mount must be [[mount]] tables (double brackets: one "
                              f"per bucket), not {got}")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(
                "nothing to mount: give s3://bucket[/prefix] or a config file with [[mount]] entries"
            )
        names = set()
        for i, e in enumerate(entries, 1):
            if not isinstance(e, dict):
                raise ConfigError(f"config: [[mount]] #{i} must be a table")
            _check_keys(e, {"name", "source", "endpoint_url", "region", "profile"},
                        f"[[mount]] #{i}")
            _no_credentials(e.get("endpoint_url"), f"config: [[mount]] #{i} endpoint_url")
            if "source" not in e:
                raise ConfigError(f"config: [[mount]] #{i} needs source = \"s3://bucket[/prefix]\"")
            for k in ("name", "source", "region", "profile"):
                parse_str(e.get(k), f"config: [[mount]] #{i} {k}")
            for k in ("endpoint_url", "region", "profile"):
                if e.get(k) == "":  # (it fell back to [s3]'s, or to AWS)
                    raise ConfigError(f"config: [[mount]] #{i} {k} is empty: leave it out "
                                      f"to use [s3] {k}")
                if flags.get(k) and e.get(k):  # (it silently sent every bucket to one place)
                    flag = "--" + k.replace("_", "-")
                    raise ConfigError(f"{flag} would replace the {k} of [[mount]] #{i} "
                                      f"({e['source']}): set it in the config file's "
                                      "[[mount]] tables, or give no [[mount]] its own")
            check_region(e.get("region"), f"config: [[mount]] #{i} region")
            bucket, prefix = parse_source(e["source"])
            if e.get("name") == "":
                # the only [[mount]]'s files at the mountpoint's top, as an s3:// source's
                if len(entries) > 1:
                    raise ConfigError(f"config: [[mount]] #{i}: an empty name (the files at "
                                      "the mountpoint's top) is for a config's only "
                                      "[[mount]]; with several, each is a directory")
                name = ""
            else:
                name = str(e.get("name") or (bucket + ("-" + prefix.strip("/").replace(
                    "/", "-") if prefix else "")))
            if name and (not _NAME_RE.fullmatch(name) or name in (".", "..")
                         or len(name.encode("utf-8", "surrogateescape")) > 255):
                raise ConfigError(f"config: [[mount]] #{i}: invalid name {name!r}")
            if name in names:
                raise ConfigError(f"config: [[mount]] #{i}: duplicate name {name!r}")
            names.add(name)
            mounts.append(MountSpec(
                name, bucket, prefix,
                check_endpoint(flags.get("endpoint_url") or e.get("endpoint_url")
                               or s3.get("endpoint_url"),
                               "--endpoint-url" if "endpoint_url" in flags
                               else f"config: [[mount]] #{i} endpoint_url"
                               if e.get("endpoint_url") else "[s3] endpoint_url"),
                flags.get("region") or e.get("region") or s3.get("region"),
                flags.get("profile") or e.get("profile") or s3.get("profile"),
            ))

    cache_dir = pick_path("cache_dir", cache, "dir", where("cache_dir", "[cache] dir"))
    if not cache_dir:
        raise ConfigError("no cache directory: give --cache-dir or [cache] dir in the config file")
    size_raw = pick("cache_size", cache, "size")
    if size_raw is None:
        raise ConfigError("no cache size: give --cache-size (e.g. 500GiB) or [cache] size")
    cache_size = parse_size(size_raw, "cache size")
    chunk_size = parse_size(pick("chunk_size", cache, "chunk_size", DEFAULT_CHUNK_SIZE),
                            "chunk size")
    if not (4 * KiB <= chunk_size <= 256 * MiB):
        raise ConfigError("chunk size must be between 4KiB and 256MiB")
    if cache_size < 2 * chunk_size:
        raise ConfigError(f"cache size {size_raw} is too small: it must hold at least two chunks "
                          f"({2 * chunk_size} bytes)")
    high = parse_fraction(pick("high_watermark", cache, "high_watermark", 0.9), "high watermark")
    low = parse_fraction(pick("low_watermark", cache, "low_watermark", 0.8), "low watermark")
    if not (0 < low < high <= 1):
        raise ConfigError("watermarks must satisfy 0 < low < high <= 1 (defaults 0.8 and 0.9)")
    ttl = parse_duration(pick("metadata_ttl", meta, "ttl", DEFAULT_METADATA_TTL), "metadata ttl")
    if ttl < 1:
        # every lookup of a path would wait for a new listing of each directory on it: an
        # `ls -l` of 300 files took 62 s and 1,806 LISTs (with 0; 1ms is no better)
        raise ConfigError("metadata ttl: must be at least 1s (less, and every lookup lists "
                          "each directory of its path again); 1s keeps listings at most a "
                          "second old")
    attr_timeout = parse_duration(pick("attr_timeout", meta, "attr_timeout", ttl), "attr timeout")
    negative_ttl = parse_duration(pick("negative_ttl", meta, "negative_ttl",
                                       DEFAULT_NEGATIVE_TTL), "negative ttl")
    if negative_ttl < 1:
        # a listing of the directory for every lookup of a name it lacks
        raise ConfigError("negative ttl: must be at least 1s (each lookup of a missing "
                          "name would list its directory again)")
    ra_given = pick("readahead_memory", read, "readahead_memory")
    # the default holds two chunks at least (chunks of 128 MiB and more)
    ra_mem = parse_size(ra_given, "read-ahead memory") if ra_given is not None \
        else max(DEFAULT_READAHEAD_MEMORY, 2 * chunk_size)
    ra_chunks = parse_count(pick("readahead_chunks", read, "readahead_chunks",
                                 DEFAULT_READAHEAD_CHUNKS), "readahead chunks")
    if ra_chunks and ra_mem < 2 * chunk_size:
        # the chunk being read is charged to it too: read-ahead would never start
        raise ConfigError(f"read-ahead memory {ra_mem} bytes holds less than two chunks of "
                          f"{chunk_size} bytes (the one being read and one ahead); give more, "
                          "or readahead_chunks = 0 to turn read-ahead off")
    pf_files = parse_count(pick("prefetch_files", read, "prefetch_files",
                                DEFAULT_PREFETCH_FILES), "prefetch files (0 turns it off)")
    kernel_ra = parse_count(read.get("kernel_read_ahead_kb", Config.kernel_read_ahead_kb),
                            "[read] kernel_read_ahead_kb")
    if not 128 <= kernel_ra <= MAX_KERNEL_READ_AHEAD_KB:
        raise ConfigError(f"[read] kernel_read_ahead_kb: expected 128 to "
                          f"{MAX_KERNEL_READ_AHEAD_KB}, got {kernel_ra}")

    s3opts = S3Options(
        max_attempts=parse_count(pick("s3_max_attempts", s3, "max_attempts",
                                      S3Options.max_attempts), "s3 max attempts"),
        request_timeout=parse_positive_duration(
            pick("s3_timeout", s3, "request_timeout", S3Options.request_timeout),
            "s3 request timeout"),
        connect_timeout=parse_positive_duration(
            s3.get("connect_timeout", S3Options.connect_timeout), "s3 connect timeout"),
        max_concurrency=parse_count(s3.get("max_concurrency", S3Options.max_concurrency),
                                    "s3 max_concurrency"),
        own_connections=parse_bool(s3.get("own_connections", S3Options.own_connections),
                                   "s3 own_connections"),
    )
    if not 1 <= s3opts.max_attempts <= MAX_ATTEMPTS:
        raise ConfigError(f"s3 max_attempts must be 1 to {MAX_ATTEMPTS}, got "
                          f"{s3opts.max_attempts}")
    if s3opts.max_concurrency < 1:
        raise ConfigError("s3 max_concurrency must be >= 1")

    peers = pick("peers", cl, "peers", ())
    if isinstance(peers, str):
        peers = tuple(p.strip() for p in peers.split(",") if p.strip())
    if not isinstance(peers, list | tuple) or not all(isinstance(p, str) for p in peers):
        raise ConfigError("[cluster] peers: expected a list of \"HOST:PORT\" strings")
    etcd = pick("etcd", cl, "etcd", ())
    if isinstance(etcd, str):
        etcd = tuple(p.strip() for p in etcd.split(",") if p.strip())
    if not isinstance(etcd, list | tuple) or not all(isinstance(e, str) for e in etcd):
        raise ConfigError("[cluster] etcd: expected a list of URLs")
    etcd = tuple((e if "://" in e else "http://" + e).rstrip("/") for e in etcd)  # HOST:PORT
    etcd_where = where("etcd", "[cluster] etcd")
    for k, e in enumerate(etcd, 1):
        _no_credentials(e, etcd_where,
                        "an etcd endpoint URL", "give the user with --etcd-user "
                        "([cluster] etcd_user) and the password in CACHEFS_ETCD_PASSWORD")
        check_endpoint(e, f"{etcd_where}: etcd endpoint #{k}")
    secret = os.environ.get("CACHEFS_PEER_SECRET") or parse_str(cl.get("peer_secret"),
                                                                 "[cluster] peer_secret",
                                                                 secret=True)
    cluster = ClusterOptions(
        node_id=parse_str(pick("node_id", cl, "node_id"), "[cluster] node_id"),
        peer_listen=pick("peer_listen", cl, "peer_listen"),
        advertise=pick("peer_advertise", cl, "advertise"),
        peers=tuple(peers),
        etcd=tuple(etcd),
        etcd_prefix=parse_str(cl.get("etcd_prefix", ClusterOptions.etcd_prefix),
                              "[cluster] etcd_prefix"),
        **{k: _readable_file(pick_path(k, cl, k, where(k, f"[cluster] {k}")),
                             where(k, f"[cluster] {k}"))
           for k in ("etcd_ca", "etcd_cert", "etcd_key")},
        etcd_user=pick("etcd_user", cl, "etcd_user"),
        etcd_password=os.environ.get("CACHEFS_ETCD_PASSWORD") or cl.get("etcd_password"),
        peer_secret=secret,
        peer_timeout=parse_positive_duration(cl.get("peer_timeout", 2.0), "peer timeout"),
        lease_ttl=math.ceil(parse_duration(cl.get("lease_ttl", 10), "[cluster] lease_ttl")),
        grace_period=parse_duration(cl.get("grace_period", 30), "grace period"),
    )
    if cluster.peers:  # malformed entries fail here, not after the daemon's start-up
        from .cluster.membership import parse_peer

        for e in cluster.peers:
            parse_peer(e, where("peers", "[cluster] peers"))
    if cluster.lease_ttl < 2:
        raise ConfigError("[cluster] lease_ttl must be at least 2 (seconds)")
    # the address other nodes connect to: a bad one fails here, not inside the daemon
    if "peer_advertise" in flags:
        parse_advertise(flags["peer_advertise"], "--peer-advertise")
    if cl.get("advertise") is not None:
        parse_advertise(cl["advertise"], "[cluster] advertise")
    if cluster.peer_listen and os.environ.get(ADVERTISE_ENV):  # read only in a cluster
        parse_advertise(os.environ[ADVERTISE_ENV], ADVERTISE_ENV)
    if cluster.peer_listen:
        parse_hostport(cluster.peer_listen, "peer listen address")
        if not cluster.peer_secret:
            raise ConfigError("a cluster needs a shared secret: set CACHEFS_PEER_SECRET "
                              "or [cluster] peer_secret")
        if not cluster.peers and not cluster.etcd:
            raise ConfigError(f"{where('peer_listen', '[cluster] peer_listen')} needs "
                              "--peers or --etcd ([cluster] peers or etcd)")
    elif cluster.peers or cluster.etcd:
        given = where("peers", "[cluster] peers") if cluster.peers else etcd_where
        raise ConfigError(f"{given} needs --peer-listen HOST:PORT ([cluster] peer_listen)")
    elif "peer_advertise" in flags or cl.get("advertise") is not None:
        raise ConfigError(f"{where('peer_advertise', '[cluster] advertise')} is for a "
                          "cluster: it needs --peer-listen and --peers or --etcd")
    if cluster.peers and cluster.etcd:
        raise ConfigError("--peers and --etcd cannot be combined: the members come from a "
                          "static list or from etcd (give one of them)")
    if cluster.etcd and "/" in str(cluster.node_id or ""):
        raise ConfigError(f"node id {cluster.node_id!r} must not contain '/' (it is an etcd key)")
    for k in ("etcd_user", "etcd_password"):
        if getattr(cluster, k) is not None and not isinstance(getattr(cluster, k), str):
            raise ConfigError(f"[cluster] {k}: expected a string")
    if cluster.etcd_user and not cluster.etcd_password:
        raise ConfigError("--etcd-user needs a password: set CACHEFS_ETCD_PASSWORD (or "
                          "[cluster] etcd_password in a file only root can read)")
    if cluster.etcd_password and not cluster.etcd_user:
        raise ConfigError("an etcd password is set (CACHEFS_ETCD_PASSWORD or [cluster] "
                          "etcd_password) but no --etcd-user")
    if cluster.etcd_user and not cluster.etcd:
        raise ConfigError("--etcd-user needs etcd endpoints (--etcd)")
    if (cluster.etcd_cert is None) != (cluster.etcd_key is None):
        raise ConfigError(f"{where('etcd_cert', '[cluster] etcd_cert')} and "
                          f"{where('etcd_key', '[cluster] etcd_key')} go together (the "
                          "client certificate and its private key)")
    if cluster.etcd_ca or cluster.etcd_cert:
        if not cluster.etcd:
            given = [where(k, f"[cluster] {k}") for k in ("etcd_ca", "etcd_cert", "etcd_key")
                     if getattr(cluster, k)]
            raise ConfigError(f"{'/'.join(given)} need{'s' if len(given) == 1 else ''} "
                              "etcd endpoints (--etcd)")
        plain = [k for k, e in enumerate(cluster.etcd, 1) if not e.startswith("https://")]
        if plain:
            raise ConfigError(f"etcd TLS options given, but {etcd_where} etcd endpoint "
                              f"#{plain[0]} is not an https:// endpoint")

    metrics = pick("metrics_listen", tr, "metrics_listen")
    if metrics:
        parse_hostport(metrics, "metrics listen address")

    level = str(pick("log_level", lg, "level", "INFO")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log level must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    log_file = pick_path("log_file", lg, "file", where("log_file", "[log] file"))

    return Config(
        mounts=tuple(mounts),
        mountpoint=Path(mountpoint).absolute(),
        cache_dir=cache_dir,
        cache_size=cache_size,
        chunk_size=chunk_size,
        high_watermark=high,
        low_watermark=low,
        metadata_ttl=ttl,
        attr_timeout=attr_timeout,
        negative_ttl=negative_ttl,
        kernel_read_ahead_kb=kernel_ra,
        page_cache=parse_bool(pick("page_cache", read, "page_cache", Config.page_cache),
                              "[read] page_cache"),
        readahead_memory=ra_mem,
        readahead_chunks=ra_chunks,
        prefetch_files=pf_files,
        allow_other=parse_bool(pick("allow_other", fu, "allow_other", False),
                               "[fuse] allow_other"),
        foreground=bool(flags.get("foreground", False)),
        log_level=level,
        log_file=log_file,
        s3=s3opts,
        cluster=cluster,
        slow_threshold=parse_duration(pick("slow_threshold", tr, "slow_threshold", 0.05),
                                      "slow threshold"),
        metrics_listen=metrics,
        otlp_endpoint=_otlp_endpoint(flags.get("otlp_endpoint"), tr.get("otlp_endpoint")),
        config_file=Path(config_file) if config_file else None,
        warnings=_exposed_secrets(config_file, cl, tr),
    )


def _exposed_secrets(config_file: str | None, cl: dict, tr: dict) -> tuple[str, ...]:
    """A warning when the config file holds a secret and users other than its owner may
    read it (a training job on the node could then read the peer secret)."""
    held = [f"[cluster] {k}" for k in ("peer_secret", "etcd_password") if cl.get(k)]
    if _carries_secret(tr.get("otlp_endpoint")):
        held.append("[trace] otlp_endpoint")
    if not config_file or not held:
        return ()
    try:
        mode = os.stat(config_file).st_mode
    except OSError:
        return ()
    if not mode & 0o077:
        return ()
    return (f"config file {config_file} holds {' and '.join(held)} and other users may read "
            f"it (mode {mode & 0o777:04o}): chmod 600 it",)


def _carries_secret(url: Any) -> bool:
    """A collector URL with user:password@ (with or without a scheme) or a ?token."""
    if not isinstance(url, str) or not url:
        return False
    try:
        query = urlsplit(url).query
    except ValueError:  # an unclosed [IPv6 address: check_endpoint says what is wrong
        query = ""
    return "@" in url or bool(query)


def _otlp_endpoint(flag: Any, table: Any) -> str | None:
    """The collector URL; one that carries a secret (user:password@, or a ?token) is
    refused on the command line, where every user sees it in the process list."""
    for v, where in ((flag, "--otlp-endpoint"), (table, "[trace] otlp_endpoint")):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where} must be a URL")
    if flag is not None:
        if _carries_secret(flag):
            raise ConfigError("--otlp-endpoint: a URL with credentials would be visible in "
                              "the process list; give it in CACHEFS_OTLP_ENDPOINT or as "
                              "[trace] otlp_endpoint in the config file")
        return check_endpoint(flag, "--otlp-endpoint")
    # the environment before the file, as for the other CACHEFS_ variables (a DaemonSet's
    # URL with a token, from a Secret, lost to the file's)
    env = os.environ.get("CACHEFS_OTLP_ENDPOINT") or None
    if env is not None:
        return check_endpoint(env, "CACHEFS_OTLP_ENDPOINT")
    return check_endpoint(table, "[trace] otlp_endpoint")


__all__ = ["Config", "MountSpec", "S3Options", "ClusterOptions", "build_config", "parse_size",
           "parse_duration"]
