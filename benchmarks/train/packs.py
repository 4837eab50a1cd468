"""Synthetic mixed image/video/text packs of an exact length, and their model FLOPs."""

from __future__ import annotations

import dataclasses
import math
import random

import torch

IGNORE = -100


@dataclasses.dataclass
class Pack:
    batch: object  # PackedBatch
    lens: list[int]  # sub-sample lengths (no padding)
    tiles: int
    supervised: int
    kinds: dict


def make_pack(cfg, seq_len: int, seed: int, mix=(0.5, 0.35, 0.15), max_frames: int = 64) -> Pack:
    """One pack of exactly ``seq_len`` tokens, no padding: images of 1-13 tiles (IAP grid + thumbnail),
    videos of 8-``max_frames`` frames (one tile + 6 wrapper tokens each), text-only samples; random ids
    with <IMG_CONTEXT> runs for the visual tokens and random tiles. Each sample's text is 60% prompt
    before the media and 40% answer after it; only the answer is supervised."""
    from megatron_eagle.batch import pack_samples

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tpt, img_id, vocab = cfg.tokens_per_tile, cfg.image_token_id, cfg.llm.vocab_size
    size = cfg.vision.image_size
    scale = tpt / 256  # the tiny preset has 16-token tiles: scale text lengths with them
    min_text = 8

    def text_len(median: float, sigma: float) -> int:
        return max(min_text, int(round(rng.lognormvariate(math.log(median * scale), sigma))))

    def rand_ids(n: int) -> torch.Tensor:
        ids = torch.randint(10, vocab, (n,), generator=g)
        return torch.where(ids == img_id, ids + 1, ids)

    samples, pixels, lens = [], [], []
    tiles_total, kinds = 0, {"image": 0, "video": 0, "text": 0}
    remaining = seq_len
    while remaining > 0:
        kind = rng.choices(("image", "video", "text"), weights=mix)[0]
        text = text_len(1200, 1.0) if kind == "text" else text_len(250, 0.9)
        frames, wrap = [], 0  # tiles per visual item; wrapper tokens per item
        if kind == "image":
            grid = rng.choice([1, 1, 2, 3, 4, 4, 6, 6, 8, 9, 12, 12, 12])
            n = grid + 1 if grid > 1 else 1
            while n > 1 and n * tpt + 2 + text > remaining:
                n -= 1
            frames, wrap = [n], 2
        elif kind == "video":
            n = min(rng.randint(8, max_frames), (remaining - text) // (tpt + 6))
            frames, wrap = [1] * n, 6
            if n < 8:
                frames = []
        visual = sum(frames) * tpt + len(frames) * wrap
        if frames and visual + text > remaining:
            frames, visual = [], 0
        if not frames:
            kind = "text"
        text = min(text, remaining - visual)
        if remaining - visual - text < 2 * min_text:  # too little left for another sample: fill the pack
            text = remaining - visual
        prompt = (text * 6) // 10
        parts = [rand_ids(prompt)] if prompt else []
        for n in frames:
            parts += [rand_ids(wrap - 1), torch.full((n * tpt,), img_id), rand_ids(1)]
        if text - prompt:
            parts.append(rand_ids(text - prompt))
        ids = torch.cat(parts)
        lab = torch.full_like(ids, IGNORE)
        if text - prompt:
            lab[-(text - prompt):] = ids[-(text - prompt):]
        n_tiles = sum(frames)
        samples.append((ids, lab))
        pixels.append(torch.randn(n_tiles, 3, size, size, generator=g))
        lens.append(ids.numel())
        tiles_total += n_tiles
        kinds[kind] += 1
        remaining -= ids.numel()
    assert sum(lens) == seq_len, (sum(lens), seq_len)
    batch = pack_samples(samples, pixels, (3, size, size))
    return Pack(batch=batch, lens=lens, tiles=tiles_total, supervised=int((batch.labels >= 0).sum()), kinds=kinds)


def flops_of(cfg, pack: Pack) -> float:
    """Model FLOPs of one training step on ``pack``, counted as the trainer counts them."""
    from megatron_eagle.config import FreezeConfig
    from megatron_eagle.training.flops import step_flops

    return step_flops(cfg, FreezeConfig(), pack.lens, pack.tiles, pack.supervised)


def pack_from_samples(cfg, lengths, tiles, seed: int = 0) -> Pack:
    """One pack of the given sub-samples (a planner's pack): sub-sample ``i`` is ``lengths[i]``
    tokens holding ``tiles[i]`` tiles (their visual tokens in one run after a 60% text prompt),
    the rest text, the text after the tiles supervised. Lengths are kept exactly; a sub-sample too
    short for its tiles (a smaller preset's tiles) keeps as many as fit."""
    from megatron_eagle.batch import pack_samples

    g = torch.Generator().manual_seed(seed)
    tpt, img_id, vocab = cfg.tokens_per_tile, cfg.image_token_id, cfg.llm.vocab_size
    size = cfg.vision.image_size

    def rand_ids(n: int) -> torch.Tensor:
        ids = torch.randint(10, vocab, (n,), generator=g)
        return torch.where(ids == img_id, ids + 1, ids)

    samples, pixels, lens, total_tiles = [], [], [], 0
    for n, t in zip((int(x) for x in lengths), (int(x) for x in tiles)):
        t = max(0, min(t, (n - 2) // tpt))
        text = n - t * tpt
        prompt = (text * 6) // 10
        ids = torch.cat([rand_ids(prompt), torch.full((t * tpt,), img_id), rand_ids(text - prompt)])
        lab = torch.full_like(ids, IGNORE)
        lab[n - (text - prompt):] = ids[n - (text - prompt):]
        samples.append((ids, lab))
        pixels.append(torch.randn(t, 3, size, size, generator=g))
        lens.append(n)
        total_tiles += t
    batch = pack_samples(samples, pixels, (3, size, size))
    return Pack(batch=batch, lens=lens, tiles=total_tiles, supervised=int((batch.labels >= 0).sum()), kinds={})
