"""A realistic mixed image/video/text length distribution: the input of `megatron-eagle plan --synthetic N`.

Modelled on Eagle 2.5's long-context stages (Image-SFT + Open-Data video + long text),
drawn per sample with a seeded generator, then passed through ADS-style budgeting for a
sequence length ``L``:

- **image (50%)**: one image with an IAP grid of ``g`` tiles, g = 1..12 (weights below favour
  4x3 since IAP upsamples small images), plus a thumbnail when g > 1, so 1-13 tiles of 256
  tokens; 2 wrapper tokens; text log-normal (median 250, sigma 0.9) for prompt + answer.
- **video (35%)**: duration log-normal (median 90 s, sigma 1.0), 2 FPS, clipped to 8-512
  frames of 256 tokens + 6 wrapper/"Frame i:" tokens each; text as for images. ADS keeps the
  text and cuts frames to fit ``L``; a video that cannot keep 8 frames is over-long.
- **text (15%)**: log-normal length (median 1200, sigma 1.4; p99 ~ 32K), never truncated,
  so the tail beyond ``L`` is over-long and must be dropped by the planner.

This is a stand-in for the real index of a prepared dataset, for what-if plans, the packing
benchmark and the planner tests.
"""

from __future__ import annotations

import numpy as np

from megatron_eagle.data.packing.common import SampleTable

TOKENS_PER_TILE = 256
IMAGE_WRAP = 2  # <img> </img>
FRAME_WRAP = 6  # "Frame i: " + <img> </img>
MIN_FRAMES, MAX_FRAMES = 8, 512
MODALITIES = ("image", "video", "text")
MIX = (0.50, 0.35, 0.15)
# P(grid of g tiles), g = 1..12: single tiles and the 4x3 grid dominate after IAP.
GRID_P = np.array([8, 6, 6, 8, 3, 10, 2, 8, 6, 4, 2, 37], dtype=np.float64) / 100


def realistic_mix(n: int, seq_len: int, seed: int = 0) -> SampleTable:
    """``n`` samples budgeted for ``seq_len``; ``dataset`` is the modality (image/video/text).

    Over-long samples keep a length > ``seq_len`` so the planner's drop path is exercised.
    """
    rng = np.random.default_rng(seed)
    mod = rng.choice(3, size=n, p=MIX)
    text = np.maximum(np.rint(rng.lognormal(np.log(250), 0.9, n)), 8).astype(np.int64)
    length = np.zeros(n, np.int64)
    tiles = np.zeros(n, np.int64)

    im = np.flatnonzero(mod == 0)
    grid = rng.choice(np.arange(1, 13), size=im.size, p=GRID_P)
    t = np.where(grid > 1, grid + 1, 1)
    tiles[im] = t
    length[im] = t * TOKENS_PER_TILE + IMAGE_WRAP + text[im]

    vi = np.flatnonzero(mod == 1)
    frames = np.clip(np.rint(2.0 * rng.lognormal(np.log(90), 1.0, vi.size)), MIN_FRAMES, MAX_FRAMES).astype(np.int64)
    fit = (seq_len - text[vi]) // (TOKENS_PER_TILE + FRAME_WRAP)  # ADS: text is kept, frames degrade
    frames = np.minimum(frames, fit)
    ok = frames >= MIN_FRAMES
    frames = np.where(ok, frames, MIN_FRAMES)
    tiles[vi] = frames
    length[vi] = frames * (TOKENS_PER_TILE + FRAME_WRAP) + text[vi]

    tx = np.flatnonzero(mod == 2)
    length[tx] = np.maximum(np.rint(rng.lognormal(np.log(1200), 1.4, tx.size)), 16).astype(np.int64)
    return SampleTable(length, tiles, mod.astype(np.int32), list(MODALITIES))

