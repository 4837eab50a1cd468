"""Write planned shards in parallel, resumably.

Each shard is one job. A finished job leaves the renamed tar and a sidecar JSON (summary, index
records, late rejects) in the work dir, tagged with the plan fingerprint; a rerun with the same
plan skips every shard whose tar and sidecar are both there and agree.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

from megatron_eagle.data.shards import ShardSample, shard_name, write_json_atomic, write_shard


class SampleSource(Protocol):
    """Produces the samples of ``[start, end)``; appends dicts to ``late_rejects`` for samples it drops."""

    def samples(self, start: int, end: int, late_rejects: list[dict[str, Any]]) -> Iterator[ShardSample]: ...


_SOURCE: Optional[SampleSource] = None


def pool_context() -> Any:
    # fork shares already-imported modules and loaded state with workers; spawn elsewhere.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _init(source: SampleSource) -> None:
    global _SOURCE
    _SOURCE = source


def _sidecar_path(work: Path, i: int) -> Path:
    return work / f"{shard_name(i)}.json"


def load_done(out: Path, work: Path, i: int, rng: tuple[int, int], fingerprint: str) -> Optional[dict[str, Any]]:
    """The sidecar of shard ``i`` if that shard is complete for this plan, else None."""
    side, tar = _sidecar_path(work, i), out / shard_name(i)
    if not side.exists() or not tar.exists():
        return None
    try:
        d = json.loads(side.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if d.get("fingerprint") != fingerprint or d.get("range") != list(rng) or d.get("bytes") != tar.stat().st_size:
        return None
    return d


def _run_job(args: tuple[str, str, int, int, int, str]) -> dict[str, Any]:
    out, work, i, start, end, fingerprint = args
    late: list[dict[str, Any]] = []
    assert _SOURCE is not None
    summary = write_shard(Path(out) / shard_name(i), _SOURCE.samples(start, end, late))
    summary.update(fingerprint=fingerprint, range=[start, end], late_rejects=late)
    write_json_atomic(_sidecar_path(Path(work), i), summary)
    return {"index": i, "samples": summary["samples"]}


def run_shard_jobs(out: Path, work: Path, ranges: Sequence[tuple[int, int]], fingerprint: str,
                   source: SampleSource, workers: int = 1, progress: bool = True,
                   desc: str = "write") -> tuple[list[dict[str, Any]], int]:
    """Write every shard not already complete; returns all sidecars in shard order and how many were skipped."""
    from tqdm import tqdm

    work.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], 0
    for i, rng in enumerate(ranges):
        if load_done(out, work, i, rng, fingerprint) is None:
            todo.append((str(out), str(work), i, rng[0], rng[1], fingerprint))
        else:
            skipped += 1
    bar = tqdm(total=len(ranges), initial=skipped, desc=desc, unit="shard", disable=not progress, file=sys.stderr)
    if workers <= 1 or len(todo) <= 1:
        _init(source)
        for job in todo:
            _run_job(job)
            bar.update(1)
    else:
        with pool_context().Pool(min(workers, len(todo)), initializer=_init, initargs=(source,)) as pool:
            for _ in pool.imap_unordered(_run_job, todo):
                bar.update(1)
    bar.close()
    sidecars = []
    for i, rng in enumerate(ranges):
        d = load_done(out, work, i, rng, fingerprint)
        if d is None:
            raise RuntimeError(f"shard {shard_name(i)} did not complete")
        sidecars.append(d)
    return sidecars, skipped


def clear_sidecars(work: Path, keep: int) -> None:
    """Remove sidecars of shards beyond the current plan."""
    if not work.exists():
        return
    for p in work.glob("shard-*.tar.json"):
        try:
            idx = int(p.name[6:12])
        except ValueError:
            continue
        if idx >= keep:
            os.unlink(p)
