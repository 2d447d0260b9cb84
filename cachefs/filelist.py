"""File lists for `cachefs preload/free/status`: parse and translate, no I/O but reading.

A file list has one entry a line:
  /mnt/train/shards/0001.tar     an absolute path under the cachefs mount
  shards/0001.tar                a path relative to the mount root (--mount)
  s3://bucket/train/shards/      an object or prefix of a mounted bucket
An entry naming a directory or prefix means everything under it.  Blank lines
and lines starting with ``#`` are skipped; surrounding whitespace is ignored.

Everything here is a pure function of the list text and the daemon's mount
table (the "info" op), so it can be unit-tested without a daemon.  Each entry
becomes a path relative to the mount root ("" is the root itself); whether it
exists is for the daemon to say.
"""

from __future__ import annotations

import codecs
import os
import posixpath
import sys
from dataclasses import dataclass

from .errors import EXIT_USAGE, QuietError
from .report import printable

HOLDER_MAX = 1024  # bytes of a data set's name (a list's real path, or --name)
MAX_FILES = 1_000_000  # files a command takes: its entries (the CLI), its walked files (daemon)


def holder_too_long(name: str) -> bool:
    return len(name.encode("utf-8", "surrogateescape")) > HOLDER_MAX


@dataclass(frozen=True)
class MountInfo:
    """One bucket/prefix of the daemon's mount table."""

    name: str  # top-level directory; "" when the bucket/prefix is the mount root
    bucket: str
    prefix: str  # "" or ending in "/"

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class Entry:
    line: int
    text: str  # the entry as written
    rel: str  # relative to the mount root, no leading/trailing "/" ("" = the root)


@dataclass(frozen=True)
class EntryError:
    line: int
    text: str
    reason: str


def read_list(path: str) -> str:
    """The text of the file list (``-`` is stdin); a missing file, or one that is not
    UTF-8 text, is one clear line.  S3 keys, and so every name in a mount, are UTF-8: a
    list that is not cannot name them (a binary file given by mistake would otherwise
    print a line of raw bytes for each of its "entries").  Read and checked a MiB at a
    time: a shard or /dev/zero given by mistake is refused at its first MiB (it was read
    whole first, all of memory for a large one, forever for /dev/zero)."""
    name = "<stdin>" if path == "-" else printable(path)
    try:
        if path == "-":
            return _checked_text(sys.stdin.buffer, name)
        with open(path, "rb") as f:
            return _checked_text(f, name)
    except FileNotFoundError:
        raise QuietError(f"file list {name}: no such file", EXIT_USAGE) from None
    except IsADirectoryError:
        raise QuietError(f"file list {name}: is a directory", EXIT_USAGE) from None
    except OSError as e:
        raise QuietError(f"file list {name}: {e.strerror or e}", EXIT_USAGE) from None


READ_PIECE = 1 << 20


def _checked_text(f, name: str) -> str:
    dec = codecs.getincrementaldecoder("utf-8-sig")()  # (a byte order mark: skipped)
    parts: list[str] = []
    lines = 0  # newlines in the pieces before this one
    while True:
        piece = f.read(READ_PIECE)
        try:
            parts.append(dec.decode(piece, final=not piece))
        except UnicodeDecodeError as e:
            line = lines + piece.count(b"\n", 0, max(0, e.start)) + 1
            raise QuietError(f"file list {name}: not UTF-8 text (line {line})",
                             EXIT_USAGE) from None
        if (nul := piece.find(b"\0")) >= 0:  # a tar of text files, zeros: UTF-8, no list
            line = lines + piece.count(b"\n", 0, nul) + 1
            raise QuietError(f"file list {name}: not a text file (a NUL byte on line {line})",
                             EXIT_USAGE)
        if not piece:
            return "".join(parts)
        lines += piece.count(b"\n")


def split_lines(text: str) -> list[tuple[int, str]]:
    """(line number, entry) for each line that is not blank or a ``#`` comment.  Lines end
    at "\n" alone (str.splitlines also ends them at \x1c-\x1e, \x85, \u2028..., all of
    which an S3 key may hold), and only spaces, tabs and a "\r" around an entry go."""
    out = []
    for n, raw in enumerate(text.split("\n"), 1):
        s = raw.strip(" \t\r")
        if not s or s.startswith("#"):
            continue
        out.append((n, s))
    return out


def mounts_from_info(info: dict) -> tuple[list[MountInfo], bool]:
    ms = [MountInfo(m.get("name") or "", m["bucket"], m.get("prefix") or "")
          for m in info.get("mounts", [])]
    return ms, bool(info.get("single_root"))


def _clean(rel: str) -> str | None:
    """Normalized relative path, or None if it climbs out of the root."""
    if not rel:
        return ""
    p = posixpath.normpath(rel)
    if p == ".":
        return ""
    if p == ".." or p.startswith("../"):
        return None
    return p.strip("/")


def translate(text: str, *, mountpoint: str, mounts: list[MountInfo],
              single_root: bool) -> str:
    """The entry as a path relative to the mount root; ValueError(reason) if it cannot be."""
    if text.startswith("s3://"):
        return _translate_s3(text, mounts, single_root)
    if "\0" in text:
        raise ValueError("contains a NUL byte")
    if text.startswith("/"):
        mp = posixpath.normpath(mountpoint)
        p = posixpath.normpath(text)
        if p != mp and not p.startswith(mp.rstrip("/") + "/"):
            # maybe a symlinked spelling of the mountpoint (resolving only the
            # parent directory: never stat through the mount for the entry itself)
            parent = os.path.realpath(posixpath.dirname(p))
            alt = posixpath.join(parent, posixpath.basename(p))
            if alt != mp and not alt.startswith(mp.rstrip("/") + "/"):
                raise ValueError(f"not under the cachefs mount {mp}")
            p = alt
        rel = p[len(mp):]
        out = _clean(rel.lstrip("/"))
    else:
        out = _clean(text)
        if out is None:
            raise ValueError("climbs out of the mount root")
    assert out is not None
    return out


def _translate_s3(text: str, mounts: list[MountInfo], single_root: bool) -> str:
    rest = text[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError("no bucket name")
    in_bucket = [m for m in mounts if m.bucket == bucket]
    if not in_bucket:
        have = ", ".join(m.source for m in mounts) or "nothing"
        raise ValueError(f"bucket {bucket} is not mounted here (mounted: {have})")
    best: MountInfo | None = None
    ties: list[MountInfo] = []
    for m in in_bucket:
        if m.prefix == "" or key.startswith(m.prefix) or key == m.prefix.rstrip("/"):
            if best is None or len(m.prefix) > len(best.prefix):
                best, ties = m, [m]
            elif len(m.prefix) == len(best.prefix):
                ties.append(m)
    if best is None:
        have = ", ".join(m.source for m in in_bucket)
        raise ValueError(f"outside the mounted prefix ({have})")
    if len(ties) > 1:
        # one bucket name from two endpoints (two sites): the first one was taken, and a
        # preload, pin or free acted on the wrong copy
        raise ValueError(f"s3://{bucket}/{best.prefix} is mounted more than once (as "
                         f"{', '.join(m.name for m in ties)}, from different endpoints): "
                         "name the file by its path under the mount")
    sub = key[len(best.prefix):] if key.startswith(best.prefix) else ""
    sub_clean = _clean(sub)
    if sub_clean is None or (sub and any(p in (".", "..") for p in sub.split("/"))):
        raise ValueError("key has '.' or '..' components")
    if single_root:
        return sub_clean
    return best.name + ("/" + sub_clean if sub_clean else "")


def parse(text: str, *, mountpoint: str, mounts: list[MountInfo],
          single_root: bool) -> tuple[list[Entry], list[EntryError]]:
    """Entries of a file list, and the lines that could not be translated."""
    entries, errors = [], []
    for n, s in split_lines(text):
        try:
            rel = translate(s, mountpoint=mountpoint, mounts=mounts, single_root=single_root)
        except ValueError as e:
            errors.append(EntryError(n, s, str(e)))
            continue
        entries.append(Entry(n, s, rel))
    return entries, errors


def absolute_entries(text: str) -> list[str]:
    """Absolute path entries (used to find the mount when there are several)."""
    return [s for _, s in split_lines(text) if s.startswith("/")]


def mount_for(paths: list[str], mountpoints: list[str]) -> str | None:
    """The one mountpoint that holds all the given absolute paths, if there is one."""
    found = set()
    for p in paths:
        p = posixpath.normpath(p)
        best = None
        for mp in mountpoints:
            if p == mp or p.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) > len(best):
                    best = mp
        if best is None:
            return None
        found.add(best)
    return found.pop() if len(found) == 1 else None
