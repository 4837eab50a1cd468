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

from megatron_eagle.config import ConfigError, ModelConfig
from megatron_eagle.data.ads import ADSConfig, ImagePlan, ads_config_from_manifest, plan_sample
from megatron_eagle.data.packing import SampleTable
from megatron_eagle.data.shards import INDEX_NAME, MANIFEST_NAME, is_url, iter_index, load_manifest


def record_length(record: Mapping[str, Any], seq_len: int, cfg: ADSConfig) -> tuple[int, int, str | None]:
    """(tokens, tiles, drop reason) of one index record at ``seq_len``; dropped: (seq_len + 1, 0, reason)."""
    res = plan_sample(record, seq_len, cfg)
    if res.plan is None:
        return seq_len + 1, 0, res.drop_reason
    tiles = sum(m.num_tiles if isinstance(m, ImagePlan) else m.num_frames for m in res.plan.media)
    return res.plan.num_tokens, tiles, None


def ads_config_for(manifest: Mapping[str, Any], model: ModelConfig | None = None) -> ADSConfig:
    """ADS knobs for a prepared dataset: the frame-prefix bound from its manifest, tokens per tile
    and tile size from ``model`` (ADSConfig's defaults, 256 tokens of 448 px tiles, without one)."""
    if model is None:
        return ads_config_from_manifest(manifest)
    return ads_config_from_manifest(manifest, tokens_per_tile=model.tokens_per_tile, tile_size=model.vision.image_size)


def table_from_prepared(dirs: list[str | Path], seq_len: int,
                        model: ModelConfig | None = None) -> tuple[SampleTable, Counter]:
    """One planner table over ``dirs`` (rows in directory order, then index order) and ADS drop counts.

    ``dataset`` is the directory's position in ``dirs``; its name is the directory name. ``model``
    sets tokens per tile and tile size (see :func:`ads_config_for`); the training loader must use
    the same model config, or its packs will not match the plan. ``dirs`` may be fsspec URLs.
    """
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
        # ADS runs per record in Python (~0.3 ms for an image, ~0.7 ms for a video).
        for rec in tqdm(iter_index(root), desc=f"ADS {name} @ {seq_len}", unit="rec", disable=None,
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
