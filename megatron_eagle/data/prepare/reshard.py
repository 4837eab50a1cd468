"""`megatron-eagle reshard`: rewrite prepared shards at a new shard size without touching raw media.

Samples are copied byte for byte through the index (random access), cut with the same balanced
planner as prepare, and the index is rebuilt, so resharding to size S gives the same shards and
index as preparing with ``--shard-size S`` directly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from megatron_eagle.data.prepare.shard_jobs import clear_sidecars, run_shard_jobs
from megatron_eagle.data.shards import (FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, REJECTS_NAME, WORK_DIR, ShardReader,
                                        ShardSample, load_index, load_manifest, parse_size, plan_shards, remove_stale,
                                        shard_name, shard_samples_from_source, write_json_atomic, write_jsonl_atomic)


@dataclass
class IndexSource:
    """Samples of an existing prepared directory, read through its index."""

    root: str
    records: list[dict[str, Any]]

    def samples(self, start: int, end: int, late_rejects: list[dict[str, Any]]) -> Iterator[ShardSample]:
        with ShardReader(self.root) as reader:
            yield from shard_samples_from_source(reader, self.records[start:end])


def reshard(src: str | Path, dst: str | Path, shard_size: int, workers: int = 1,
            progress: bool = False) -> dict[str, Any]:
    """Write ``src``'s samples into ``dst`` with shards of about ``shard_size`` bytes; returns the new manifest."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError("reshard writes a new directory; --output must differ from the input")
    manifest = load_manifest(src)
    records = load_index(src)
    ranges = plan_shards([int(r["length"]) for r in records], shard_size)
    h = hashlib.sha256(f"reshard format={FORMAT_VERSION}\n".encode())
    h.update(json.dumps([s["sha256"] for s in manifest["shards"]]).encode())
    h.update(json.dumps(ranges).encode())
    dst.mkdir(parents=True, exist_ok=True)
    work = dst / WORK_DIR
    sidecars, _ = run_shard_jobs(dst, work, ranges, h.hexdigest()[:32], IndexSource(str(src), records),
                                 workers, progress, desc="reshard")
    remove_stale(dst, {shard_name(i) for i in range(len(ranges))})
    clear_sidecars(work, len(ranges))
    new_records = [r for d in sidecars for r in d["records"]]
    write_jsonl_atomic(dst / INDEX_NAME, new_records)
    shutil.copyfile(src / REJECTS_NAME, dst / REJECTS_NAME)
    out = dict(manifest)
    out.update(shard_size=shard_size,
               shards=[{k: d[k] for k in ("name", "samples", "bytes", "sha256")} for d in sidecars],
               total_bytes=sum(d["bytes"] for d in sidecars), written_samples=len(new_records),
               resharded_from={"shard_size": manifest["shard_size"], "shards": len(manifest["shards"])})
    write_json_atomic(dst / MANIFEST_NAME, out)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle reshard`."""
    p.add_argument("path", help="prepared directory")
    p.add_argument("--shard-size", type=parse_size, required=True, help="new target shard size, e.g. 4GiB")
    p.add_argument("--output", required=True, help="new directory")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        m = reshard(args.path, args.output, args.shard_size, args.workers,
                    progress=not args.no_progress and sys.stderr.isatty())
    except (ValueError, FileNotFoundError) as e:
        print(f"reshard: {e}", file=sys.stderr)
        return 2
    print(f"resharded {m['written_samples']} samples into {len(m['shards'])} shards "
          f"({m['total_bytes']} bytes) in {args.output}")
    return 0
