"""Shared fixtures for model tests: tiny configs, deterministic full weights, packs."""

from __future__ import annotations

import torch

from megatron_eagle.batch import IGNORE_INDEX, pack_samples
from megatron_eagle.config import ParallelConfig, preset_model_config


def tiny_model_config(tie: bool = False, preset: str = "tiny"):
    cfg = preset_model_config(preset)
    cfg.llm.tie_embeddings = tie
    return cfg


def full_reference_state(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-layout weights from a single-rank model built with a fixed seed (call inside a
    process group of size 1 or with model parallel initialised at tp=pp=1)."""
    from megatron_eagle.convert.sharding import iter_full_parameters
    from megatron_eagle.models.eagle import EagleModel

    torch.manual_seed(seed)
    model = EagleModel(cfg, ParallelConfig())
    return {k: v.clone() for k, v in iter_full_parameters(model)}


def mixed_pack(cfg, seed: int = 0, pad_to_multiple: int = 1):
    """A pack with an image sample (2 tiles), a video-like sample (3 frames), and text."""
    g = torch.Generator().manual_seed(seed)
    tpt, img = cfg.tokens_per_tile, cfg.image_token_id
    vocab = cfg.llm.vocab_size
    rnd = lambda n: torch.randint(10, vocab, (n,), generator=g)  # noqa: E731
    samples, tiles = [], []
    for n_tiles in (2, 3, 0):
        ids = torch.cat([rnd(5), torch.full((n_tiles * tpt,), img), rnd(9)])
        lab = torch.full_like(ids, IGNORE_INDEX)
        lab[-6:] = ids[-6:]
        samples.append((ids, lab))
        tiles.append(torch.randn(n_tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g))
    shape = (3, cfg.vision.image_size, cfg.vision.image_size)
    return pack_samples(samples, tiles, shape, pad_to_multiple=pad_to_multiple)
