"""Planner input from prepared data directories (``megatron-eagle prepare`` output).

Each directory holds ``index.jsonl`` (per sample: text token count and media metadata) and
``manifest.json``. For a stage length ``L`` every record goes through ADS (frames per video,
tile cap, IAP grids) to get the sample's token count and its ViT tiles/frames; samples ADS
cannot fit are marked over-long (length ``L + 1``) so the planner drops and counts them.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
from tqdm import tqdm

from megatron_eagle.config import ConfigError, ModelConfig
from megatron_eagle.data.media.ads import ADSConfig, ads_config_from_manifest, sample_length
from megatron_eagle.data.packing.common import SampleTable
from megatron_eagle.data.shards import INDEX_NAME, MANIFEST_NAME, is_url, iter_index_lines, load_manifest

CHUNK_LINES = 20_000  # index lines per task of the process pool


def record_length(record: Mapping[str, Any], seq_len: int, cfg: ADSConfig) -> tuple[int, int, str | None]:
    """(tokens, tiles, drop reason) of one index record at ``seq_len``; dropped: (seq_len + 1, 0, reason)."""
    n, tiles, why = sample_length(record, seq_len, cfg)
    return (seq_len + 1, 0, why) if n is None else (n, tiles, None)


def _lengths_of_lines(args: tuple[list[str], int, ADSConfig]) -> tuple[list[int], list[int], Counter]:
    """ADS over a chunk of index lines (JSON parse included): lengths, tiles and drop counts."""
    lines, seq_len, cfg = args
    lengths, tiles, drops = [], [], Counter()
    for line in lines:
        n, t, why = record_length(json.loads(line), seq_len, cfg)
        lengths.append(n)
        tiles.append(t)
        if why:
            drops[why] += 1
    return lengths, tiles, drops


def _chunks(root: str | Path, size: int) -> Iterator[list[str]]:
    lines = iter_index_lines(root)
    while chunk := list(itertools.islice(lines, size)):
        yield chunk


class _Pool:
    """Ordered map over a process pool started only once there is more than one chunk (small indexes
    stay in this process), with at most 2 x workers chunks in flight: the index is read as the pool
    works, never held whole. Spawned workers: callers may hold threads (fork would be unsafe)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def map(self, fn, tasks: Iterator) -> Iterator:
        head = list(itertools.islice(tasks, 2))
        if len(head) < 2 or self.workers == 1:
            yield from map(fn, itertools.chain(head, tasks))
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        pending = collections.deque(self.pool.submit(fn, t) for t in head)
        for task in tasks:
            pending.append(self.pool.submit(fn, task))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def ads_config_for(manifest: Mapping[str, Any], model: ModelConfig | None = None) -> ADSConfig:
    """ADS knobs for a prepared dataset: the frame-prefix bound from its manifest, tokens per tile
    and tile size from ``model`` (ADSConfig's defaults, 256 tokens of 448 px tiles, without one)."""
    if model is None:
        return ads_config_from_manifest(manifest)
    return ads_config_from_manifest(manifest, tokens_per_tile=model.tokens_per_tile, tile_size=model.vision.image_size)


def table_from_prepared(dirs: list[str | Path], seq_len: int, model: ModelConfig | None = None,
                        workers: Optional[int] = None, chunk_lines: int = CHUNK_LINES) -> tuple[SampleTable, Counter]:
    """One planner table over ``dirs`` (rows in directory order, then index order) and ADS drop counts.

    ``dataset`` is the directory's position in ``dirs``; its name is the directory name. ``model``
    sets tokens per tile and tile size (see :func:`ads_config_for`); the training loader must use
    the same model config, or its packs will not match the plan. ``dirs`` may be fsspec URLs.
    ADS runs in ``workers`` processes (default: the CPUs, at most 16) over chunks of
    ``chunk_lines`` index lines, in order: the table does not depend on ``workers``.
    """
    pool = _Pool(min(os.cpu_count() or 1, 16) if workers is None else max(1, int(workers)))
    try:
        return _table(dirs, seq_len, model, pool, chunk_lines)
    finally:
        pool.close()


def _table(dirs: list[str | Path], seq_len: int, model: ModelConfig | None, pool: _Pool,
           chunk_lines: int) -> tuple[SampleTable, Counter]:
    lengths: list[int] = []
    tiles: list[int] = []
    ds: list[int] = []
    drops: Counter = Counter()
    names = []
    for d, root in enumerate(dirs):
        if is_url(root):
            manifest = load_manifest(root)
            name = str(root).rstrip("/").rsplit("/", 1)[-1]
        else:
            root = Path(root)
            if not (root / INDEX_NAME).is_file():
                raise ConfigError("--data", f"{root} has no {INDEX_NAME}",
                                  "point --data at a directory written by `megatron-eagle prepare`, or use --lengths")
            manifest = load_manifest(root) if (root / MANIFEST_NAME).is_file() else {}
            name = root.resolve().name
        cfg = ads_config_for(manifest, model)
        names.append(name)
        tasks = ((chunk, seq_len, cfg) for chunk in _chunks(root, chunk_lines))
        results = pool.map(_lengths_of_lines, tasks)
        with tqdm(desc=f"ADS {name} @ {seq_len}", unit="rec", disable=None, mininterval=2.0, leave=False) as bar:
            for n, t, why in results:
                lengths += n
                tiles += t
                ds += [d] * len(n)
                drops.update(why)
                bar.update(len(n))
    if not lengths:
        raise ConfigError("--data", f"no samples in {[str(d) for d in dirs]}", "prepare the data first")
    return SampleTable(np.array(lengths), np.array(tiles), np.array(ds), names), drops
