"""Control-socket handlers of a running daemon (the CLI's other end)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .daemon import Daemon


def register_all(d: Daemon) -> None:
    srv = d.control
    assert srv is not None

    async def info(req, emit):
        return {"pid": os.getpid(), "mountpoint": str(d.cfg.mountpoint.absolute()),
                "cache_dir": str(d.cfg.cache_dir),
                "mounts": [{"name": m.name, "source": m.source, "bucket": m.bucket,
                            "prefix": m.prefix} for m in d.cfg.mounts],
                "chunk_size": d.cfg.chunk_size, "single_root": d.cfg.single_root}

    async def stats(req, emit):
        out = stats_dict(d)
        if d.cluster is not None and req.get("nodes"):
            out["cluster"]["nodes_cache"] = await d.cluster.cache_by_node()
        return {"stats": out}

    async def stop(req, emit):
        d.stop()
        return {}

    srv.register("info", info)
    srv.register("stats", stats)
    srv.register("stop", stop)
    from .plugins import optional_modules

    for mod in optional_modules("cachefs.datasets", "cachefs.tracing"):
        mod.register(d)


def stats_dict(d: Daemon) -> dict:
    assert d.store is not None and d.vfs is not None and d.reader is not None
    c = d.stats.snapshot()
    out = {
        "uptime_s": round(time.time() - d.started_at, 1),
        "cache": d.store.statistics(),
        "counters": c,
        "in_flight_fetches": d.reader.in_flight,
        "readahead_bytes": d.vfs.budget.used,
        "readahead_peak_bytes": d.vfs.budget.peak,
        "memo_bytes": d.vfs.memo.used,
        "chunk_buffers": d.store.buffers.statistics() if d.store.buffers else None,
        "open_files": len(d.vfs.handles),
        "inodes": len(d.vfs.nodes),
        "index_commits": d.writer.commits if d.writer else 0,
        "index_syncs": d.writer.syncs if d.writer else 0,
        "tracing": d.tracer.statistics(),
    }
    if d.cluster is not None:
        out["cluster"] = d.cluster.statistics()
    return out
