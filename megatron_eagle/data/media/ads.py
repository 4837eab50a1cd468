"""Automatic Degrade Sampling (Eagle 2.5 §3.2.1): fit a sample into a stage's max length.

Text is never truncated. Given the index record of a sample (text token count and media
metadata), choose frames per video and a tile cap from {12, 8, 6, 4, 2, 1} so that text + visual
tokens fit ``max_seq_len``. Pure functions over the index; the same shards give different plans
at 32K, 64K and 128K.

Frames per video follow ``ADSConfig.frame_sampling``:
- ``official`` (Eagle 2.5's preparation): ``total`` frames of the video (a clip: ``int((end-start)*fps)``
  from frame ``int(start*fps)``); all of them when ``total <= min_frames``, else
  ``n = clamp(int(total*min(max_fps, fps)/fps), min_frames, max_frames)`` at ``round(linspace(0, total-1, n))``.
  ADS lowers ``n`` (never below ``min_frames``) only when the budget requires it; the prompt states
  the rate used, ``n / duration`` (the video's fps when every frame of a short video is taken).
- ``centres``: up to ``max_fps`` over the clip, at the centres of equal segments.
A sample whose videos cannot get their minimum frames is dropped at that length.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union

from megatron_eagle.data.media.tiling import DEFAULT_MAX_TILES, DEFAULT_TILE_SIZE, Grid, choose_grid, num_tiles

DROP_TEXT_TOO_LONG = "text exceeds max length"
DROP_MEDIA_TOO_LONG = "images do not fit at one tile"
DROP_FRAMES_BELOW_MIN = "video frames below minimum"


@dataclass(frozen=True)
class ImagePlan:
    """How to present one image: its tile grid (a thumbnail is added when it has > 1 tile)."""

    grid: Grid

    @property
    def num_tiles(self) -> int:
        return num_tiles(self.grid)


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of one video to decode, and their times (seconds from the clip start) for the prompt.

    ``duration`` and ``rate`` are what the eagle2.5 header states ("… of D seconds at F fps").
    """

    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    duration: Optional[float] = None
    rate: Optional[float] = None

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


MediaPlan = Union[ImagePlan, VideoPlan]


@dataclass(frozen=True)
class SamplePlan:
    """ADS result for one sample at one max length. ``num_tokens`` is an upper bound on its length."""

    media: tuple[MediaPlan, ...]
    tile_cap: int
    text_tokens: int
    visual_tokens: int
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        out = []
        for m in self.media:
            if isinstance(m, ImagePlan):
                out.append({"type": "image", "grid": list(m.grid)})
            else:
                v = {"type": "video", "frame_indices": list(m.frame_indices), "timestamps": list(m.timestamps)}
                if m.duration is not None:
                    v.update(duration=m.duration, rate=m.rate)
                out.append(v)
        return {"media": out, "tile_cap": self.tile_cap, "text_tokens": self.text_tokens,
                "visual_tokens": self.visual_tokens, "num_tokens": self.num_tokens}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "SamplePlan":
        media: list[MediaPlan] = []
        for m in d["media"]:
            if m["type"] == "image":
                media.append(ImagePlan(tuple(m["grid"])))
            else:
                media.append(VideoPlan(tuple(m["frame_indices"]), tuple(m["timestamps"]), m.get("duration"),
                                       m.get("rate")))
        return SamplePlan(tuple(media), d["tile_cap"], d["text_tokens"], d["visual_tokens"], d["num_tokens"])


@dataclass(frozen=True)
class ADSConfig:
    """Budgeting knobs. ``frame_text_tokens`` bounds the tokens of one frame prefix ("Frame i: "),
    ``video_text_tokens`` those of one video header, ``image_text_tokens`` the text around one image
    ("<image k>" and a newline); prepare's manifest records the bounds for its tokenizer and prompt
    format (``prompt.*``), and its video sampling settings (``video_sampling``)."""

    tokens_per_tile: int = 256
    tile_size: int = DEFAULT_TILE_SIZE
    tile_caps: tuple[int, ...] = (12, 8, 6, 4, 2, 1)
    max_tiles: int = DEFAULT_MAX_TILES
    tiling_method: Literal["iap", "internvl"] = "iap"
    max_fps: float = 2.0
    min_frames: int = 8
    max_frames: int = 1024
    frame_text_tokens: int = 16
    media_wrap_tokens: int = 2  # <img> and </img>
    video_text_tokens: int = 0
    image_text_tokens: int = 0
    frame_sampling: Literal["official", "centres"] = "centres"

    @property
    def frame_tokens(self) -> int:
        return self.tokens_per_tile + self.media_wrap_tokens + self.frame_text_tokens

    def image_tokens(self, width: int, height: int, cap: int) -> int:
        grid = choose_grid(width, height, cap, self.tiling_method, self.tile_size)
        return num_tiles(grid) * self.tokens_per_tile + self.media_wrap_tokens + self.image_text_tokens


@dataclass(frozen=True)
class ADSResult:
    plan: Optional[SamplePlan]
    drop_reason: Optional[str] = None


# ----------------------------------------------------------------------------- video frames

def clip_frame_range(video: Mapping[str, Any]) -> tuple[int, int]:
    """[first, last] frame indices inside the clip [start, end) of a video index entry."""
    fps, frames = float(video["fps"]), int(video["frames"])
    start, end = float(video.get("start") or 0.0), float(video.get("end") or video["duration"])
    first = min(max(0, math.ceil(start * fps - 1e-6)), frames - 1)
    last = min(frames - 1, max(first, math.ceil(end * fps - 1e-6) - 1))
    return first, last


def max_video_frames(video: Mapping[str, Any], cfg: ADSConfig) -> int:
    """N_max: frames at max_fps over the clip (at least one), capped by what exists and max_frames."""
    first, last = clip_frame_range(video)
    start, end = float(video.get("start") or 0.0), float(video.get("end") or video["duration"])
    at_fps = max(1, math.floor(cfg.max_fps * max(0.0, end - start) + 1e-9))
    return max(1, min(last - first + 1, at_fps, cfg.max_frames))


def min_video_frames(video: Mapping[str, Any], cfg: ADSConfig) -> int:
    """N_min: ``min_frames``, or every frame allowed at max_fps when a clip is shorter than that."""
    return max(1, min(cfg.min_frames, max_video_frames(video, cfg)))


def sample_frame_indices(video: Mapping[str, Any], n: int) -> VideoPlan:
    """``n`` frames at the centres of ``n`` equal segments of the clip, with clip-relative times."""
    first, last = clip_frame_range(video)
    avail = last - first + 1
    n = max(1, min(n, avail))
    fps, start = float(video["fps"]), float(video.get("start") or 0.0)
    idx = tuple(first + min(avail - 1, int((k + 0.5) * avail / n)) for k in range(n))
    times = tuple(round(max(0.0, i / fps - start), 3) for i in idx)
    return VideoPlan(idx, times)


def official_frame_span(video: Mapping[str, Any]) -> tuple[int, int]:
    """(first frame, total frames) the official rule samples from: the whole video, or for a clip
    ``int((end - start) * fps)`` frames from ``int(start * fps)``."""
    fps, frames = float(video["fps"]), int(video["frames"])
    start, end = float(video.get("start") or 0.0), float(video.get("end") or video["duration"])
    if not video.get("clip", start > 0 or end < float(video["duration"])):
        return 0, frames
    first = min(int(start * fps), max(frames - 1, 0))
    return first, max(0, min(int((end - start) * fps), frames - first))


def official_frame_count(video: Mapping[str, Any], cfg: ADSConfig) -> int:
    """Frames the official rule takes before any budget: all when ``total <= min_frames``, else
    ``clamp(int(total * min(max_fps, fps) / fps), min_frames, max_frames)``."""
    fps = float(video["fps"])
    _, total = official_frame_span(video)
    if total <= cfg.min_frames:
        return total
    n = int(total * min(cfg.max_fps, fps) / fps)
    return min(max(n, cfg.min_frames), cfg.max_frames)


def official_frame_indices(video: Mapping[str, Any], n: int, cfg: ADSConfig) -> VideoPlan:
    """``n`` corner-aligned frames ``round(linspace(0, total - 1, n))`` (numpy rounding: half to even)
    of the span, with clip-relative times and the header's duration and rate."""
    import numpy as np

    fps = float(video["fps"])
    first, total = official_frame_span(video)
    n = max(1, min(n, total))
    rel = np.linspace(0, total - 1, n).round().astype(np.int64).tolist()
    rate = fps if (n == total and total <= cfg.min_frames) else n / float(video["duration"])
    return VideoPlan(tuple(first + r for r in rel), tuple(r / fps for r in rel), float(video["duration"]), rate)


def _distribute_frames(lo: list[int], hi: list[int], dur: list[float], budget: int) -> list[int]:
    """Frames per video: one common rate (clamped per video to [lo, hi]) as high as the budget allows,
    then leftover frames one at a time to the video with the lowest rate."""
    if sum(hi) <= budget:
        return list(hi)

    def counts(rate: float) -> list[int]:
        return [min(h, max(l, math.floor(rate * d + 1e-9))) for l, h, d in zip(lo, hi, dur)]

    a, b = 0.0, max(h / max(d, 1e-6) for h, d in zip(hi, dur)) + 1.0
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if sum(counts(mid)) <= budget else (a, mid)
    n = counts(a)
    left = budget - sum(n)
    while left > 0:
        open_ = [i for i in range(len(n)) if n[i] < hi[i]]
        if not open_:
            break
        i = min(open_, key=lambda j: (n[j] / max(dur[j], 1e-6), j))
        n[i] += 1
        left -= 1
    return n


# ----------------------------------------------------------------------------- the planner

@dataclass(frozen=True)
class _Budget:
    """What ADS decided for one record: the tile cap and frames per video (media order)."""

    cap: int
    frames: tuple[int, ...]
    visual_tokens: int


def _budget(record: Mapping[str, Any], max_seq_len: int, cfg: ADSConfig) -> Union[_Budget, str]:
    """The ADS decision for one record, or the reason it cannot fit (see :func:`plan_sample`)."""
    media = record.get("media") or []
    text = int(record["text_tokens"])
    l_vis = max_seq_len - text
    if l_vis < 0:
        return DROP_TEXT_TOO_LONG
    images = [m for m in media if m["type"] == "image"]
    videos = [m for m in media if m["type"] == "video"]
    image_floor = sum(cfg.image_tokens(m["width"], m["height"], 1) for m in images)
    if image_floor > l_vis:
        return DROP_MEDIA_TOO_LONG

    frames: list[int] = []
    if videos:
        if cfg.frame_sampling == "official":
            hi = [max(1, official_frame_count(v, cfg)) for v in videos]
            lo = [min(cfg.min_frames, h) for h in hi]
        else:
            lo = [min_video_frames(v, cfg) for v in videos]
            hi = [max_video_frames(v, cfg) for v in videos]
        dur = [max(1e-3, float(v.get("end") or v["duration"]) - float(v.get("start") or 0.0)) for v in videos]
        budget = (l_vis - image_floor - len(videos) * cfg.video_text_tokens) // cfg.frame_tokens
        if budget < sum(lo):
            return DROP_FRAMES_BELOW_MIN
        frames = _distribute_frames(lo, hi, dur, budget)
    video_tokens = sum(frames) * cfg.frame_tokens + len(videos) * cfg.video_text_tokens

    caps = sorted({c for c in cfg.tile_caps if c <= cfg.max_tiles} | {1, cfg.max_tiles}, reverse=True)
    left = l_vis - video_tokens
    cap, image_tokens = 1, image_floor
    for c in caps:
        tokens = sum(cfg.image_tokens(m["width"], m["height"], c) for m in images)
        if tokens <= left:
            cap, image_tokens = c, tokens
            break
    return _Budget(cap, tuple(frames), image_tokens + video_tokens)


def plan_sample(record: Mapping[str, Any], max_seq_len: int, cfg: ADSConfig = ADSConfig()) -> ADSResult:
    """Choose frames per video and a tile cap so the sample fits ``max_seq_len`` tokens.

    ``record`` is an index record (``text_tokens`` and ``media`` with image width/height and
    video fps/frames/duration/start/end). Phase 1 (temporal): with every image at one tile, give
    videos as many frames as fit, up to max_fps; drop the sample if any video would get fewer than
    its minimum. Phase 2 (tiling): the largest cap in ``tile_caps`` whose images fit what is left.
    """
    b = _budget(record, max_seq_len, cfg)
    if isinstance(b, str):
        return ADSResult(None, b)
    plans: list[MediaPlan] = []
    frames = iter(b.frames)
    for m in record.get("media") or []:
        if m["type"] == "image":
            plans.append(ImagePlan(choose_grid(m["width"], m["height"], b.cap, cfg.tiling_method, cfg.tile_size)))
        else:
            n = next(frames)
            plans.append(official_frame_indices(m, n, cfg) if cfg.frame_sampling == "official"
                         else sample_frame_indices(m, n))
    text = int(record["text_tokens"])
    return ADSResult(SamplePlan(tuple(plans), b.cap, text, b.visual_tokens, text + b.visual_tokens))


def sample_length(record: Mapping[str, Any], max_seq_len: int,
                  cfg: ADSConfig = ADSConfig()) -> tuple[Optional[int], int, Optional[str]]:
    """(tokens, ViT tiles + frames, drop reason) of :func:`plan_sample` without building the plan
    (no frame indices or timestamps): what the pack planner needs, for millions of records."""
    b = _budget(record, max_seq_len, cfg)
    if isinstance(b, str):
        return None, 0, b
    tiles = sum(num_tiles(choose_grid(m["width"], m["height"], b.cap, cfg.tiling_method, cfg.tile_size))
                for m in record.get("media") or [] if m["type"] == "image")
    return int(record["text_tokens"]) + b.visual_tokens, tiles + sum(b.frames), None


def plan_records(records: Iterable[Mapping[str, Any]], max_seq_len: int,
                 cfg: ADSConfig = ADSConfig()) -> tuple[list[Optional[SamplePlan]], Counter]:
    """Plan every record; returns plans aligned with the input (None where dropped) and drop counts."""
    plans: list[Optional[SamplePlan]] = []
    drops: Counter = Counter()
    for r in records:
        res = plan_sample(r, max_seq_len, cfg)
        plans.append(res.plan)
        if res.plan is None:
            drops[res.drop_reason] += 1
    return plans, drops


def ads_config_from_manifest(manifest: Mapping[str, Any], **overrides: Any) -> ADSConfig:
    """An ADSConfig with a prepared dataset's prompt bounds, frame sampling and tile cap."""
    kw: dict[str, Any] = {}
    prompt = manifest.get("prompt") or {}
    for key, field_ in (("frame_prefix_tokens", "frame_text_tokens"), ("video_text_tokens", "video_text_tokens"),
                        ("image_text_tokens", "image_text_tokens")):
        if prompt.get(key) is not None:
            kw[field_] = int(prompt[key])
    vs = manifest.get("video_sampling") or {}
    if vs:
        kw.update(frame_sampling=vs.get("rule", "official"), max_fps=float(vs["fps"]),
                  min_frames=int(vs["min_frames"]), max_frames=int(vs["max_frames"]))
    if manifest.get("max_dynamic_tiles") is not None:
        kw["max_tiles"] = int(manifest["max_dynamic_tiles"])
    kw.update(overrides)
    return ADSConfig(**kw)


def video_plans(plan: SamplePlan) -> Sequence[VideoPlan]:
    """The video entries of a plan, in media order."""
    return [m for m in plan.media if isinstance(m, VideoPlan)]
