"""Prompt and pixel inputs for generation: images, video frames, chat template.

The data pipeline (``megatron_eagle.data.media``) defines how training turns media into
tokens; generation reuses it so both agree. When those modules are unavailable, a minimal
fallback is used instead: one resized tile per image, PyAV decoding of N frames at the
centres of N equal segments, and the same placeholder text.
``USE_DATA_PIPELINE`` switches between them (tests flip it to exercise the fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megatron_eagle.pixels import normalize
from megatron_eagle.tokenizer import IMG_CONTEXT, IMG_END, IMG_START

USE_DATA_PIPELINE = True
_PLACEHOLDER = re.compile(r"<(image|video)(?:-(\d+))?>")


def _data_pipeline_available() -> bool:
    if not USE_DATA_PIPELINE:
        return False
    try:
        import megatron_eagle.data.media.ads  # noqa: F401
        import megatron_eagle.data.media.image  # noqa: F401
        import megatron_eagle.data.media.prompt  # noqa: F401
        import megatron_eagle.data.media.tiling  # noqa: F401
        import megatron_eagle.data.media.video  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ImageInput:
    tiles: torch.Tensor          # [n, 3, S, S] normalised
    grid: tuple[int, int]        # (cols, rows); (1, 1) for a single tile


@dataclass
class VideoInput:
    tiles: torch.Tensor          # [frames, 3, S, S] normalised
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]


def _pil_tile(img, size: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- images

def load_image(path: str | Path, tile_size: int, max_tiles: int = 12) -> ImageInput:
    """Tiles of one image: IAP grid + thumbnail via the data pipeline, else one resized tile."""
    data = Path(path).read_bytes()
    if _data_pipeline_available():
        from megatron_eagle.data.media.image import decode_image, image_to_tiles
        from megatron_eagle.data.media.tiling import choose_grid

        img = decode_image(data)
        grid = choose_grid(img.width, img.height, max_tiles, "iap", tile_size)
        return ImageInput(image_to_tiles(img, grid, tile_size), tuple(grid))
    import io

    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return ImageInput(normalize(_pil_tile(img, tile_size)).unsqueeze(0), (1, 1))


# ----------------------------------------------------------------------------- videos

def load_video(path: str | Path, tile_size: int, num_frames: int = 8) -> VideoInput:
    """``num_frames`` frames at the centres of equal segments, one tile each, with their times."""
    if _data_pipeline_available():
        from megatron_eagle.data.media.ads import sample_frame_indices
        from megatron_eagle.data.media.video import probe_video, video_to_tiles

        plan = sample_frame_indices(probe_video(str(path)), num_frames)
        tiles, _ = video_to_tiles(str(path), plan.frame_indices, tile_size)
        return VideoInput(tiles, tuple(plan.frame_indices), tuple(plan.timestamps))
    return _load_video_fallback(path, tile_size, num_frames)


def _load_video_fallback(path: str | Path, tile_size: int, num_frames: int) -> VideoInput:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.to_image(), float(f.time or 0.0)) for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"no decodable frames in {path}")
    n = max(1, min(num_frames, len(frames)))
    idx = tuple(min(len(frames) - 1, int((k + 0.5) * len(frames) / n)) for k in range(n))
    t0 = frames[0][1]
    tiles = torch.stack([normalize(_pil_tile(frames[i][0], tile_size)) for i in idx])
    return VideoInput(tiles, idx, tuple(round(frames[i][1] - t0, 3) for i in idx))


# ----------------------------------------------------------------------------- prompt

def with_placeholders(prompt: str, n_images: int, n_videos: int) -> str:
    """Prepend ``<image>``/``<video>`` lines for media the prompt does not mention."""
    kinds = [m.group(1) for m in _PLACEHOLDER.finditer(prompt)]
    missing_images = max(0, n_images - kinds.count("image"))
    missing_videos = max(0, n_videos - kinds.count("video"))
    return "<image>\n" * missing_images + "<video>\n" * missing_videos + prompt


def _expand_fallback(text: str, images: Sequence[ImageInput], videos: Sequence[VideoInput], tpt: int) -> str:
    counters = {"image": 0, "video": 0}

    def repl(m: re.Match) -> str:
        kind = m.group(1)
        k = int(m.group(2)) - 1 if m.group(2) else counters[kind]
        counters[kind] += 1
        if kind == "image":
            return IMG_START + IMG_CONTEXT * (images[k].tiles.shape[0] * tpt) + IMG_END
        v = videos[k]
        return "".join(f"Frame {i} at {t:.1f} s: " + IMG_START + IMG_CONTEXT * tpt + IMG_END
                       for i, t in enumerate(v.timestamps, start=1))
    return _PLACEHOLDER.sub(repl, text)


def _media_in_prompt_order(text: str, images, videos) -> list:
    counters = {"image": 0, "video": 0}
    order = []
    for m in _PLACEHOLDER.finditer(text):
        kind = m.group(1)
        k = int(m.group(2)) - 1 if m.group(2) else counters[kind]
        counters[kind] += 1
        order.append(images[k] if kind == "image" else videos[k])
    return order


def build_inputs(tok, prompt: str, images: Sequence[ImageInput] = (), videos: Sequence[VideoInput] = (),
                 tokens_per_tile: int = 256, tile_size: int = 448) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [L], pixel_values [n, 3, S, S])`` for a one-turn chat prompt awaiting the answer.

    Placeholders ``<image>``/``<video>`` (or ``<image-k>``) mark where media go; missing
    ones are prepended. Tiles are ordered like their ``<IMG_CONTEXT>`` runs in the ids.
    """
    text = with_placeholders(prompt, len(images), len(videos))
    order = _media_in_prompt_order(text, images, videos)
    tiles = [m.tiles for m in order]
    pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, tile_size, tile_size)
    conv = [{"role": "user", "content": text}]
    if _data_pipeline_available():
        from megatron_eagle.data.media.ads import ImagePlan, VideoPlan
        from megatron_eagle.data.media.prompt import tokenize_conversation

        plan = [ImagePlan(tuple(i.grid)) for i in images] + \
               [VideoPlan(tuple(v.frame_indices), tuple(v.timestamps)) for v in videos]
        ids, _ = tokenize_conversation(tok, conv, plan, tokens_per_tile, add_generation_prompt=True)
    else:
        conv[0]["content"] = _expand_fallback(text, images, videos, tokens_per_tile)
        rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if int((ids == ctx).sum()) != pixels.shape[0] * tokens_per_tile:
        raise ValueError(f"prompt has {int((ids == ctx).sum())} {IMG_CONTEXT} tokens for {pixels.shape[0]} tiles")
    return ids, pixels
