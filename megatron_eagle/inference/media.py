"""Prompt and pixel inputs for generation: images, video frames, chat template.

The data pipeline (``megatron_eagle.data.media``) defines how training turns media into
tokens; generation reuses it so both agree. ``prompt_format`` is that of the training data:
``eagle2.5`` (default; N frames at ``round(linspace(0, T-1, N))``, the video header, ChatML with
Eagle's system prompt) or ``frame-times`` (N frames at segment centres, the tokenizer's template).
When those modules are unavailable, a minimal fallback is used instead: one resized tile per
image, PyAV decoding of the same frames, and the same text.
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
    duration: float = 0.0        # seconds, and the rate the eagle2.5 header states
    rate: float = 0.0


_EAGLE_SYSTEM = "You are an AI assistant whose name is Eagle-Next."
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def _corner_aligned(total: int, n: int) -> tuple[tuple[int, ...], float]:
    """``n`` of ``total`` frames at round(linspace(0, total-1, n)); with the count actually taken."""
    import numpy as np

    n = max(1, min(n, total))
    return tuple(np.linspace(0, total - 1, n).round().astype(np.int64).tolist()), n


def _header_rate(n: int, total: int, fps: float, duration: float, min_frames: int = 8) -> float:
    return fps if (n == total and total <= min_frames) else n / max(duration, 1e-6)


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

def load_video(path: str | Path, tile_size: int, num_frames: int = 8, prompt_format: str = "eagle2.5") -> VideoInput:
    """``num_frames`` frames, one tile each, with their times: corner-aligned under eagle2.5,
    at the centres of equal segments under frame-times."""
    if _data_pipeline_available():
        from megatron_eagle.data.media.ads import sample_frame_indices
        from megatron_eagle.data.media.video import probe_video, video_to_tiles

        meta = probe_video(str(path))
        if prompt_format == "eagle2.5":
            idx, n = _corner_aligned(meta["frames"], num_frames)
            times = tuple(i / meta["fps"] for i in idx)
            rate = _header_rate(n, meta["frames"], meta["fps"], meta["duration"])
            tiles, _ = video_to_tiles(str(path), idx, tile_size)
            return VideoInput(tiles, idx, times, meta["duration"], rate)
        plan = sample_frame_indices(meta, num_frames)
        tiles, _ = video_to_tiles(str(path), plan.frame_indices, tile_size)
        return VideoInput(tiles, tuple(plan.frame_indices), tuple(plan.timestamps))
    return _load_video_fallback(path, tile_size, num_frames, prompt_format)


def _load_video_fallback(path: str | Path, tile_size: int, num_frames: int, prompt_format: str) -> VideoInput:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        frames = [(f.to_image(), float(f.time or 0.0)) for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"no decodable frames in {path}")
    if prompt_format == "eagle2.5":
        idx, n = _corner_aligned(len(frames), num_frames)
        duration = duration or len(frames) / fps
        tiles = torch.stack([normalize(_pil_tile(frames[i][0], tile_size)) for i in idx])
        return VideoInput(tiles, idx, tuple(i / fps for i in idx), duration,
                          _header_rate(n, len(frames), fps, duration))
    n = max(1, min(num_frames, len(frames)))
    idx = tuple(min(len(frames) - 1, int((k + 0.5) * len(frames) / n)) for k in range(n))
    t0 = frames[0][1]
    tiles = torch.stack([normalize(_pil_tile(frames[i][0], tile_size)) for i in idx])
    return VideoInput(tiles, idx, tuple(round(frames[i][1] - t0, 3) for i in idx))


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


def _expand_fallback(text: str, images: Sequence[ImageInput], videos: Sequence[VideoInput], tpt: int,
                     eagle: bool) -> str:
    counters = {"image": 0, "video": 0}

    def repl(m: re.Match) -> str:
        kind = m.group(1)
        k = int(m.group(2)) - 1 if m.group(2) else counters[kind]
        counters[kind] += 1
        if kind == "image":
            body = IMG_START + IMG_CONTEXT * (images[k].tiles.shape[0] * tpt) + IMG_END
            return ((f"<image {k + 1}>" if len(images) > 1 else "") + body + "\n") if eagle else body
        v = videos[k]
        if not eagle:
            return "".join(f"Frame {i} at {t:.1f} s: " + IMG_START + IMG_CONTEXT * tpt + IMG_END
                           for i, t in enumerate(v.timestamps, start=1))
        word = _ORDINALS[k] if k < len(_ORDINALS) else str(k + 1)
        return (f"The {word} video of {v.duration:.2f} seconds at {v.rate:.2f} fps: "
                + "".join(f"Frame {i}: " + IMG_START + IMG_CONTEXT * tpt + IMG_END
                          for i in range(1, len(v.timestamps) + 1)) + "\n")
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
    conv = [{"role": "user", "content": text}]
    if _data_pipeline_available():
        from megatron_eagle.data.media.ads import ImagePlan, VideoPlan
        from megatron_eagle.data.media.prompt import tokenize_conversation

        plan = [ImagePlan(tuple(i.grid)) for i in images] + \
               [VideoPlan(tuple(v.frame_indices), tuple(v.timestamps), v.duration, v.rate) for v in videos]
        ids, _ = tokenize_conversation(tok, conv, plan, tokens_per_tile, add_generation_prompt=True,
                                       fmt=prompt_format)
    else:
        content = _expand_fallback(text, images, videos, tokens_per_tile, eagle)
        if eagle:
            rendered = (f"<|im_start|>system\n{_EAGLE_SYSTEM}<|im_end|>\n<|im_start|>user\n{content.strip()}"
                        "<|im_end|>\n<|im_start|>assistant\n")
        else:
            conv[0]["content"] = content
            rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if int((ids == ctx).sum()) != pixels.shape[0] * tokens_per_tile:
        raise ValueError(f"prompt has {int((ids == ctx).sum())} {IMG_CONTEXT} tokens for {pixels.shape[0]} tiles")
    return ids, pixels
