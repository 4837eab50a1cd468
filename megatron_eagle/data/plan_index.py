"""Planner input from prepared data directories (``megatron-eagle prepare`` output).

Each directory holds ``index.jsonl`` (per sample: text token count and media metadata) and
``manifest.json``. For a stage length ``L`` every record goes through ADS (frames per video,
tile cap, IAP grids) to get the sample's token count and its ViT tiles/frames; samples ADS
cannot fit are marked over-long (length ``L + 1``) so the planner drops and counts them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from megatron_eagle.config import ConfigError
from megatron_eagle.data.ads import ADSConfig, ImagePlan, ads_config_from_manifest, plan_sample
from megatron_eagle.data.packing import SampleTable
from megatron_eagle.data.shards import INDEX_NAME, MANIFEST_NAME, iter_index, load_manifest


def record_length(record: Mapping[str, Any], seq_len: int, cfg: ADSConfig) -> tuple[int, int, str | None]:
    """(tokens, tiles, drop reason) of one index record at ``seq_len``; dropped: (seq_len + 1, 0, reason)."""
    res = plan_sample(record, seq_len, cfg)
    if res.plan is None:
        return seq_len + 1, 0, res.drop_reason
    tiles = sum(m.num_tiles if isinstance(m, ImagePlan) else m.num_frames for m in res.plan.media)
    return res.plan.num_tokens, tiles, None


def table_from_prepared(dirs: list[str | Path], seq_len: int) -> tuple[SampleTable, Counter]:
    """One planner table over ``dirs`` (rows in directory order, then index order) and ADS drop counts.

    ``dataset`` is the directory's position in ``dirs``; its name is the directory name.
    """
    lengths: list[int] = []
    tiles: list[int] = []
    ds: list[int] = []
    drops: Counter = Counter()
    names = []
    for d, root in enumerate(dirs):
        root = Path(root)
        if not (root / INDEX_NAME).is_file():
            raise ConfigError("--data", f"{root} has no {INDEX_NAME}",
                              "point --data at a directory written by `megatron-eagle prepare`, or use --lengths")
        manifest = load_manifest(root) if (root / MANIFEST_NAME).is_file() else {}
        cfg = ads_config_from_manifest(manifest)
        names.append(root.resolve().name)
        # ADS runs per record in Python (~0.3 ms for an image, ~0.7 ms for a video).
        for rec in tqdm(iter_index(root), desc=f"ADS {root.name} @ {seq_len}", unit="rec", disable=None,
                        mininterval=2.0, leave=False):
            n, t, why = record_length(rec, seq_len, cfg)
            lengths.append(n)
            tiles.append(t)
            ds.append(d)
            if why:
                drops[why] += 1
    if not lengths:
        raise ConfigError("--data", f"no samples in {[str(d) for d in dirs]}", "prepare the data first")
    return SampleTable(np.array(lengths), np.array(tiles), np.array(ds), names), drops
