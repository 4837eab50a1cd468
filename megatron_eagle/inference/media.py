"""Prompt and pixel inputs for generation: images, video frames, chat template.

The data pipeline (``megatron_eagle.data.media``) defines how training turns media into
tokens; generation calls it so both agree. ``prompt_format`` is that of the training data:
``eagle2.5`` (default; the official corner-aligned frames, the video header, ChatML with
Eagle's system prompt) or ``frame-times`` (N frames at segment centres, the tokenizer's template).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_eagle.data.media.ads import (ADSConfig, ImagePlan, VideoPlan, official_frame_indices,
                                           sample_frame_indices)
from megatron_eagle.data.media.image import decode_image, image_to_tiles
from megatron_eagle.data.media.prompt import tokenize_conversation
from megatron_eagle.data.media.tiling import choose_grid
from megatron_eagle.data.media.video import probe_video, video_to_tiles
from megatron_eagle.tokenizer import IMG_CONTEXT

_PLACEHOLDER = re.compile(r"<(image|video)(?:-(\d+))?>")


@dataclass
class ImageInput:
    tiles: torch.Tensor          # [n, 3, S, S] normalised
    grid: tuple[int, int]        # (cols, rows); (1, 1) for a single tile


@dataclass
class VideoInput:
    tiles: torch.Tensor          # [frames, 3, S, S] normalised
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    duration: float = 0.0        # seconds, and the rate the eagle2.5 header states
    rate: float = 0.0


# ----------------------------------------------------------------------------- images

def load_image(path: str | Path, tile_size: int, max_tiles: int = 12) -> ImageInput:
    """Tiles of one image: the IAP grid plus a thumbnail, as in training."""
    img = decode_image(Path(path).read_bytes())
    grid = choose_grid(img.width, img.height, max_tiles, "iap", tile_size)
    return ImageInput(image_to_tiles(img, grid, tile_size), tuple(grid))


# ----------------------------------------------------------------------------- videos

def load_video(path: str | Path, tile_size: int, num_frames: int = 8, prompt_format: str = "eagle2.5") -> VideoInput:
    """``num_frames`` frames, one tile each, with their times: corner-aligned under eagle2.5 (the
    official rule, with the header's duration and rate), at the centres of equal segments under
    frame-times."""
    meta = probe_video(str(path))
    if prompt_format == "eagle2.5":
        plan = official_frame_indices(meta, num_frames, ADSConfig())
    else:
        plan = sample_frame_indices(meta, num_frames)
    tiles, _ = video_to_tiles(str(path), plan.frame_indices, tile_size)
    return VideoInput(tiles, tuple(plan.frame_indices), tuple(plan.timestamps), plan.duration or 0.0,
                      plan.rate or 0.0)


# ----------------------------------------------------------------------------- prompt

def with_placeholders(prompt: str, n_images: int, n_videos: int, prompt_format: str = "frame-times") -> str:
    """Prepend placeholders for media the prompt does not mention: ``<image>``/``<video>`` lines, or
    under eagle2.5 where training puts them (video tags, then image tags, then the text)."""
    kinds = [m.group(1) for m in _PLACEHOLDER.finditer(prompt)]
    missing_images = max(0, n_images - kinds.count("image"))
    missing_videos = max(0, n_videos - kinds.count("video"))
    if prompt_format == "eagle2.5":
        return "<video>" * missing_videos + "<image>" * missing_images + prompt
    return "<image>\n" * missing_images + "<video>\n" * missing_videos + prompt


def _media_in_prompt_order(text: str, images, videos) -> list:
    counters = {"image": 0, "video": 0}
    order = []
    for m in _PLACEHOLDER.finditer(text):
        kind = m.group(1)
        k = int(m.group(2)) - 1 if m.group(2) else counters[kind]
        counters[kind] += 1
        order.append(images[k] if kind == "image" else videos[k])
    return order


def _strip_tag_newlines(text: str) -> str:
    """eagle2.5 writes a newline after each medium, so one right after an unnumbered tag is dropped."""
    return re.sub(r"<(image|video)>\n", r"<\1>", text)


def build_inputs(tok, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                 tokens_per_tile: int = 256, tile_size: int = 448,
                 prompt_format: str = "eagle2.5") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [L], pixel_values [n, 3, S, S])`` for a one-turn chat prompt awaiting the answer.

    Placeholders ``<image>``/``<video>`` (or ``<image-k>``) mark where media go; missing
    ones are prepended. Tiles are ordered like their ``<IMG_CONTEXT>`` runs in the ids.
    """
    eagle = prompt_format == "eagle2.5"
    text = with_placeholders(prompt, len(images), len(videos), prompt_format)
    if eagle:
        text = _strip_tag_newlines(text)
    order = _media_in_prompt_order(text, images, videos)
    tiles = [m.tiles for m in order]
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, tile_size, tile_size)
    plan = [ImagePlan(tuple(i.grid)) for i in images] + \
           [VideoPlan(tuple(v.frame_indices), tuple(v.timestamps), v.duration, v.rate) for v in videos]
    ids, _ = tokenize_conversation(tok, [{"role": "user", "content": text}], plan, tokens_per_tile,
                                   add_generation_prompt=True, fmt=prompt_format)
    ids = torch.tensor(ids, dtype=torch.long)
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if int((ids == ctx).sum()) != pixels.shape[0] * tokens_per_tile:
        raise ValueError(f"prompt has {int((ids == ctx).sum())} {IMG_CONTEXT} tokens for {pixels.shape[0]} tiles")
    return ids, pixels
