"""Chunk identity: bucket + key + ETag + chunk size + index, hashed to 16 bytes.

The id is the only name a chunk has on disk, in the index and on the wire, so
no S3 key can ever name a path, and two versions of an object (two ETags)
never share a chunk.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..objectstore import ObjectStore


@functools.lru_cache(maxsize=8192)
def chunk_id(bucket: str, key: str, etag: str, chunk_size: int, index: int) -> bytes:
    """(Remembered for the last 8192: opening a small file asks for its one chunk's id three
    times, from the prefetcher, the hand-over of prefetched bytes and the read.)"""
    h = hashlib.blake2b(digest_size=16, person=b"cachefs-chunk-1")
    for part in (bucket, key, etag):
        b = part.encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    h.update(chunk_size.to_bytes(8, "little"))
    h.update(index.to_bytes(8, "little"))
    return h.digest()


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One version of one object, as a file was opened (or listed)."""

    mount: str  # mount name ("" for a single-bucket mount)
    bucket: str
    key: str
    etag: str
    size: int
    chunk_size: int
    store: ObjectStore | None = field(default=None, compare=False, repr=False)

    @property
    def nchunks(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def chunk(self, index: int) -> ChunkRef:
        return ChunkRef(self, index, index * self.chunk_size, self.chunk_len(index),
                        chunk_id(self.bucket, self.key, self.etag, self.chunk_size, index))

    def chunks(self) -> list[ChunkRef]:
        return [self.chunk(i) for i in range(self.nchunks)]


@dataclass(frozen=True, slots=True)
class ChunkRef:
    obj: ObjectVersion
    index: int
    offset: int
    length: int
    cid: bytes

    def describe(self) -> dict:
        """What a peer needs to fetch this chunk itself (no credentials, no paths)."""
        o = self.obj
        return {"mount": o.mount, "bucket": o.bucket, "key": o.key, "etag": o.etag,
                "size": o.size, "chunk_size": o.chunk_size, "index": self.index}
